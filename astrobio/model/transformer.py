"""RebuiltLLMIntegration: a Llama-style decoder-only transformer (RMSNorm, rotary positions, SwiGLU,
causal attention through PyTorch SDPA, or flash-attn on a GPU when installed).

Each layer has two paths: eager PyTorch (the specification), and with ``fused`` set on its module (by
``astrobio.model.fast.use_kernels``) the fused kernels for the tensors' device: RMSNorm with the
residual add, rotary of q and k in one launch, SwiGLU's silu(gate) * up, and, where the device has one
(the Triton kernels of astrobio.kernels), the chunked linear cross-entropy of ``loss``. On the CPU
they are the C++ ops of astrobio.model.cpu_layers. The kernels are imported only when switched on
(into ``FUSED``), so importing the model never imports triton.

Initialisation is deterministic per parameter: each tensor draws from a generator seeded by the run's
seed and the parameter's name, so a model built whole, or stage by stage on different ranks, or on the
meta device and materialised later, gets the same weights.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

try:  # optional: used on CUDA for bf16/fp16 inputs
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

FUSED = {}  # device type -> the fused ops (astrobio.model.fast.FusedOps) use_kernels switched on there


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be a multiple of n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim {self.d_model // self.n_heads} must be even for rotary positions")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return FUSED[x.device.type].rmsnorm(x, self.weight, self.eps)[0]
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, theta: float, device, offset: int = 0):
    """cos and sin of shape [seq_len, head_dim / 2], fp32, for positions offset .. offset+seq_len-1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, head_dim]; rotates pairs (even, odd) of each head."""
    x32 = x.float().unflatten(-1, (-1, 2))
    a, b = x32[..., 0], x32[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


def attend(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``attention(q, k, v, **kwargs)``: PyTorch's SDPA, or the fused ops' causal attention (the C++
    kernel, fp32 only). On the CPU under bf16 autocast it runs in fp32: PyTorch's CPU flash-attention
    backward is about 3x slower in bf16 than in fp32 (a tiny-model step on one core: 93 ms in fp32, 94 ms
    under autocast, 66 ms under autocast with attention in fp32; docs/MODEL.md). A bf16 model keeps SDPA
    (the C++ kernel would keep fp32 copies of q, k, v where SDPA keeps bf16)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return attention(q.float(), k.float(), v.float(), **kwargs)
    return attention(q, k, v, **kwargs)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.fused = False
        self.fused_projections = False  # q, k, v as one matrix product (astrobio.model.fast.fuse_projections)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[batch, seq, d_model]``: three products, or one of the weights concatenated."""
        if self.fused_projections:
            weight = torch.cat((self.wq.weight, self.wk.weight, self.wv.weight))
            return F.linear(x, weight).split(self.config.d_model, dim=-1)
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: dict | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, hd = self.config.n_heads, self.config.head_dim
        q, k, v = (y.reshape(b, t, h, hd) for y in self.projections(x))
        if self.fused:
            q, k = FUSED[q.device.type].rotary(q, k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        causal = True
        if kv_cache is not None:
            if "k" in kv_cache:
                k = torch.cat((kv_cache["k"], k), dim=1)
                v = torch.cat((kv_cache["v"], v), dim=1)
                causal = t > 1  # one new token attends to everything cached
            kv_cache["k"], kv_cache["v"] = k, v
        fused_attention = FUSED[x.device.type].attention if self.fused else None  # the CPU's C++ kernel
        if (fused_attention is not None and kv_cache is None
                and (q.dtype == torch.float32 or torch.is_autocast_enabled("cpu"))):
            out = attend(fused_attention, q, k, v)
        elif (flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
                and (causal or t == 1)):
            out = flash_attn_func(q, k, v, causal=causal)
        else:
            q, k, v = (y.transpose(1, 2) for y in (q, k, v))
            mask = None
            if causal and k.shape[2] != t:  # prefill onto a non-empty cache: offset causal mask
                mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
            out = attend(F.scaled_dot_product_attention, q, k, v, attn_mask=mask,
                         is_causal=causal and mask is None).transpose(1, 2)
        return self.wo(out.reshape(b, t, h * hd))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.w_up = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.w_down = nn.Linear(config.ffn_hidden, config.d_model, bias=False)
        self.fused = False
        self.fused_projections = False  # gate and up as one matrix product (astrobio.model.fast.fuse_projections)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_projections:
            weight = torch.cat((self.w_gate.weight, self.w_up.weight))
            return F.linear(x, weight).split(self.w_gate.out_features, dim=-1)
        return self.w_gate(x), self.w_up(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        if self.fused:
            return self.w_down(FUSED[gate.device.type].silu_mul(gate, up))
        return self.w_down(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.fused = False

    def forward(self, x, cos, sin, kv_cache=None):
        if self.fused:  # the residual add inside mlp_norm's kernel
            attended = self.attn(self.attn_norm(x), cos, sin, kv_cache)
            normed, x = FUSED[x.device.type].rmsnorm(attended, self.mlp_norm.weight, self.mlp_norm.eps, residual=x)
            return x + self.mlp(normed)
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


class RebuiltLLMIntegration(nn.Module):
    """The astrobiology language model: embedding, ``n_layers`` blocks, final norm, untied head.

    ``forward(tokens, prefix=None)`` returns logits ``[batch, prefix + seq, vocab]``; ``prefix`` is an
    optional ``[batch, p, d_model]`` tensor of embeddings (from the multimodal encoders) placed before
    the token embeddings.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.fused = False  # the chunked loss (set with the layers' kernels by use_kernels)

    def forward(self, tokens: torch.Tensor, prefix: torch.Tensor | None = None,
                kv_caches: list[dict] | None = None, position_offset: int = 0) -> torch.Tensor:
        return self.head(self.hidden_states(tokens, prefix, kv_caches, position_offset))

    def hidden_states(self, tokens: torch.Tensor, prefix: torch.Tensor | None = None,
                      kv_caches: list[dict] | None = None, position_offset: int = 0) -> torch.Tensor:
        """The final norm's output ``[batch, prefix + seq, d_model]`` (the head's input)."""
        x = embed_tokens(self, tokens, prefix)
        x = run_blocks(self.layers, x, self.config, self.gradient_checkpointing, kv_caches, position_offset)
        return self.norm(x)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, prefix: torch.Tensor | None = None,
             ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of the token positions (targets ``[batch, seq]``, ``ignore_index``
        where nothing is predicted), as ``F.cross_entropy`` of the fp32 logits; the fused path on CUDA (the
        chunked loss) never materialises the logits of all positions."""
        hidden = self.hidden_states(tokens, prefix)
        return head_loss(self.head, hidden[:, hidden.shape[1] - targets.shape[1]:], targets, self.fused,
                         ignore_index)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def embed_tokens(model: nn.Module, tokens: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be int64 or int32 token ids, got {tokens.dtype}")
    x = model.embed(tokens)
    if prefix is not None:
        x = torch.cat((prefix.to(x.dtype), x), dim=1)
    return x


def head_loss(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, fused: bool,
              ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` ([batch, seq, d_model]) against targets [batch, seq]."""
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match targets {tuple(targets.shape)}: "
                         "expected [batch, seq, d_model] and [batch, seq]")
    chunked = FUSED[hidden.device.type].linear_cross_entropy if fused else None
    if chunked is not None:
        # the chunked loss reads the head's weight without calling the head: run what would run before its
        # forward, e.g. the offload engine's wait for the head's updated weights (its forward hooks, which
        # ZB-H1's weight pass records calls with, stay out: the head is not called)
        for hook in head._forward_pre_hooks.values():
            hook(head, (hidden,))
        return chunked(hidden, head.weight, targets, ignore_index)
    return F.cross_entropy(head(hidden).float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def run_blocks(layers: nn.ModuleList, x: torch.Tensor, config: ModelConfig, use_checkpointing: bool,
               kv_caches: list[dict] | None = None, position_offset: int = 0) -> torch.Tensor:
    """Runs a contiguous run of blocks over hidden states x ``[batch, seq, d_model]``."""
    if x.shape[1] + position_offset > config.max_seq_len:
        raise ValueError(f"sequence of {x.shape[1] + position_offset} positions exceeds max_seq_len "
                         f"{config.max_seq_len}; use shorter sequences or a model with a longer max_seq_len")
    cos, sin = rotary_tables(x.shape[1], config.head_dim, config.rope_theta, x.device, position_offset)
    for i, block in enumerate(layers):
        cache = kv_caches[i] if kv_caches is not None else None
        if use_checkpointing and torch.is_grad_enabled() and cache is None:
            x = checkpoint(block, x, cos, sin, use_reentrant=False)
        else:
            x = block(x, cos, sin, cache)
    return x


def parameter_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


@torch.no_grad()
def init_parameters(module: nn.Module, config: ModelConfig, seed: int, prefix: str = "") -> None:
    """Deterministic initialisation: normal(0, init_std) for matrices and embeddings (output
    projections scaled by 1/sqrt(2 * n_layers), as GPT-2), ones for norms. Each parameter draws from
    its own generator seeded by ``seed`` and its full name (``prefix`` + local name), so the result is
    the same however the model is cut into stages."""
    for name, p in module.named_parameters():
        full = prefix + name
        if full.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        std = config.init_std
        if full.endswith(("wo.weight", "w_down.weight")):
            std /= math.sqrt(2 * config.n_layers)
        gen = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, full))
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std))


def build_model(config: ModelConfig, seed: int = 0, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> RebuiltLLMIntegration:
    """Builds the model; on ``device="meta"`` no memory is allocated (parameter counts, planning).
    ``astrobio.model.use_kernels(model, "fused")`` then switches on the fused kernels where they run."""
    with torch.device("meta"):
        model = RebuiltLLMIntegration(config)
    if torch.device(device).type == "meta":
        return model.to(dtype)
    model = model.to_empty(device="cpu").to(torch.float32)
    init_parameters(model, config, seed)
    return model.to(device=device, dtype=dtype)
