"""Model artifacts others can load: safetensors weights with a config and the tokenizer, in astrobio's
own layout or as a Hugging Face Llama-family causal LM.

Export streams tensor by tensor: weights are read one at a time from the checkpoint's safetensors
files and written in shards of bounded size, so a 13B model never sits in memory whole.

Hugging Face layout: our rotary positions rotate interleaved pairs (x[2i], x[2i+1]) while
transformers' Llama rotates halves (x[i], x[i + d/2]); the rows of wq and wk are permuted per head
(even rows first, then odd rows) so that the exported model computes the same logits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict

import torch
from safetensors.torch import save_file

from astrobio.model import ModelConfig

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "head.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    """Our parameter name -> the transformers Llama name."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"parameter {name!r} has no Hugging Face Llama counterpart")


def interleaved_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permutes the output rows of wq/wk per head from interleaved rotary pairs to rotate-half order."""
    d_out, d_in = weight.shape
    head_dim = d_out // n_heads
    return weight.view(n_heads, head_dim // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def to_hf(name: str, tensor: torch.Tensor, config: ModelConfig) -> tuple[str, torch.Tensor]:
    if name.endswith(("attn.wq.weight", "attn.wk.weight")):
        tensor = interleaved_to_halves(tensor, config.n_heads)
    return hf_name(name), tensor


def hf_config(config: ModelConfig, dtype: torch.dtype, bos_id: int | None, eos_id: int | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.d_model, "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads, "head_dim": config.head_dim,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
    }


def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str, prefix: str,
                 shard_bytes: int = 2 << 30) -> dict[str, str]:
    """Writes tensors into ``prefix-0000k.safetensors`` shards of at most ``shard_bytes`` (a single
    larger tensor gets a shard of its own); returns the name -> file weight map."""
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0

    def flush():
        nonlocal shard, size, index
        if shard:
            file = f"{prefix}-{index:05d}.safetensors"
            save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
            shard, size, index = {}, 0, index + 1

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        size += nbytes
    flush()
    return weight_map


def export_weights(named_tensors: Iterator[tuple[str, torch.Tensor]], config: ModelConfig, out_dir: str,
                   fmt: str = "safetensors", dtype: torch.dtype = torch.bfloat16,
                   tokenizer_files: dict[str, str] | None = None, bos_id: int | None = None,
                   eos_id: int | None = None, shard_bytes: int = 2 << 30) -> list[str]:
    """Writes a model directory; returns the files written. ``named_tensors`` yields our names.
    ``tokenizer_files`` maps file names in the output to their text content."""
    if fmt not in ("safetensors", "hf"):
        raise ValueError(f"unknown export format {fmt!r}; choose safetensors or hf")
    os.makedirs(out_dir, exist_ok=True)
    if fmt == "hf":
        stream = (to_hf(n, t.to(dtype), config) for n, t in named_tensors)
        weight_map = write_shards(stream, out_dir, "model", shard_bytes)
        meta = hf_config(config, dtype, bos_id, eos_id)
    else:
        stream = ((n, t.to(dtype)) for n, t in named_tensors)
        weight_map = write_shards(stream, out_dir, "astrobio", shard_bytes)
        meta = {"format": "astrobio", "model": asdict(config), "dtype": str(dtype).removeprefix("torch."),
                "bos_token_id": bos_id, "eos_token_id": eos_id}
    written = sorted(set(weight_map.values()))
    index_name = "model.safetensors.index.json" if fmt == "hf" else "astrobio.safetensors.index.json"
    files = {"config.json": meta, index_name: {"metadata": {}, "weight_map": weight_map}}
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)
        written.append(name)
    for name, text in (tokenizer_files or {}).items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)
        written.append(name)
    return written
