"""Training-step speed of the model: tokens/s and MFU of forward + backward (+ an AdamW8bit step).

    python benchmarks/bench_model.py --model tiny                                  # CPU
    python benchmarks/bench_model.py --model small --device cuda --json small.json
    python benchmarks/bench_model.py --model 13b --layers 4 --batch-size 2 --seq-len 2048 --device cuda

One model shape (a preset of astrobio.model; ``--layers N`` keeps the preset's shapes with N blocks, e.g.
a 13B-shaped stage), the same batch for every provider, all in one process:

    eager            astrobio's model in plain PyTorch (the specification)
    fused            astrobio's Triton kernels (RMSNorm + residual, rotary, silu*up, chunked loss): CUDA
    compiled         eager blocks under torch.compile (astrobio.model.compile_blocks)
    fused+compiled   both
    eager+proj, fused+compiled+proj
                     the same with q, k, v and gate, up as one product each, their weights concatenated at
                     use (astrobio.model.fuse_projections)
    llama            transformers' LlamaForCausalLM of the same shape (sdpa attention), the peer

Before timing, each provider's loss and gradients on the batch are compared with the eager model's
(the Llama peer gets the eager model's weights, its q / k rows permuted from interleaved rotary pairs
to its half-split convention, and its gradients are mapped back); a provider off by more than the
tolerance is reported and not timed. Tolerance: relative error of the loss and of each parameter's
gradient norm, fp32 1e-4, bf16 5e-2 (transformers' Llama and the eager model in bf16 differ by 1.2e-2
on tiny; a wrong kernel by order 1).

MFU = FLOPs per step / step time / peak. FLOPs per step: 6 x (parameters that multiply activations:
all but the embedding and the norm scales) x tokens, plus causal attention 6 x layers x d_model x
seq x tokens (QK^T and AV forward, twice that backward, half of each score matrix skipped). The
peak is ``--peak-tflops``, by default the device's dense bf16 peak where known (H100 / H200: 989.5), or
``--measure-peak`` (the best of a few large matmuls in the benchmark's dtype).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from astrobio.model import build_model, compile_blocks, fuse_projections, get_config, use_kernels
from astrobio.optim import AdamW8bit

PROVIDERS = ("eager", "eager+proj", "fused", "compiled", "fused+compiled", "fused+compiled+proj", "llama")
KNOWN_PEAKS_TFLOPS = {"H100": 989.5, "H200": 989.5, "A100": 312.0, "A5000": 111.1}  # dense bf16 tensor cores
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # relative: loss, and each gradient's norm


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="astrobio.model preset (default tiny)")
    parser.add_argument("--layers", type=int, help="number of blocks (default: the preset's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "autocast"),
                        help="weights and activations: fp32, bf16, or bf16 autocast over fp32 weights "
                             "(default bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per provider (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--optimizer", action="store_true", help="include an AdamW8bit step in each step")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " +
                        ", ".join(PROVIDERS))
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known dense bf16 peak)")
    parser.add_argument("--measure-peak", action="store_true", help="measure the peak with large matmuls")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    unknown = set(args.providers.split(",")) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}; choose from {', '.join(PROVIDERS)}")
    return args


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ FLOPs and peak

def matmul_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed")
               and not name.endswith("norm.weight"))


def flops_per_step(model: torch.nn.Module, tokens: int, seq_len: int) -> float:
    c = model.config
    return 6.0 * matmul_parameters(model) * tokens + 6.0 * c.n_layers * c.d_model * seq_len * tokens


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in KNOWN_PEAKS_TFLOPS.items() if key in name), None)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n ** 3 / best / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ providers

def llama_peer(model: torch.nn.Module):
    """transformers' LlamaForCausalLM with the model's weights (None when transformers is missing)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    c = model.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_hidden,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
                         max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
                         attn_implementation="sdpa")
    p = next(model.parameters())
    with torch.device(p.device):
        llama = LlamaForCausalLM(config).to(p.dtype)
    with torch.no_grad():
        for name, tensor in llama.named_parameters():
            tensor.copy_(to_llama(model, name))
    return llama


def rotary_permutation(c) -> torch.Tensor:
    """Rows of wq / wk: per head, the interleaved pairs (2j, 2j + 1) -> Llama's halves (j, j + head_dim / 2)."""
    within = torch.cat((torch.arange(0, c.head_dim, 2), torch.arange(1, c.head_dim, 2)))
    return (torch.arange(c.n_heads)[:, None] * c.head_dim + within[None, :]).flatten()


def llama_name(name: str) -> str:
    """astrobio's parameter name for a LlamaForCausalLM one."""
    for theirs, ours in (("model.embed_tokens", "embed"), ("model.norm", "norm"), ("lm_head", "head"),
                         ("model.layers", "layers"), ("self_attn.q_proj", "attn.wq"), ("self_attn.k_proj", "attn.wk"),
                         ("self_attn.v_proj", "attn.wv"), ("self_attn.o_proj", "attn.wo"),
                         ("mlp.gate_proj", "mlp.w_gate"), ("mlp.up_proj", "mlp.w_up"), ("mlp.down_proj", "mlp.w_down"),
                         ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
        name = name.replace(theirs, ours)
    return name


def to_llama(model: torch.nn.Module, llama_param: str) -> torch.Tensor:
    ours = llama_name(llama_param)
    tensor = model.get_parameter(ours)
    if ours.endswith(("attn.wq.weight", "attn.wk.weight")):
        tensor = tensor[rotary_permutation(model.config).to(tensor.device)]
    return tensor


def llama_grads_as_ours(config, llama) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in llama.named_parameters():
        ours = llama_name(name)
        g = p.grad
        if ours.endswith(("attn.wq.weight", "attn.wk.weight")):
            g = torch.empty_like(g).index_copy_(0, rotary_permutation(config).to(g.device), g)
        grads[ours] = g
    return grads


def make_provider(name: str, base: torch.nn.Module, args: argparse.Namespace):
    """(module, loss function of (inputs, targets), its gradients under astrobio's parameter names), or a
    string saying why the provider is skipped. Each provider starts from a copy of ``base``'s weights."""
    if name == "llama":
        llama = llama_peer(base)
        if llama is None:
            return "transformers is not installed"
        if args.checkpointing:
            llama.gradient_checkpointing_enable()
        return (llama, lambda x, y: F.cross_entropy(llama(input_ids=x).logits.float().flatten(0, 1), y.flatten()),
                lambda: llama_grads_as_ours(base.config, llama))
    model = copy.deepcopy(base)
    model.gradient_checkpointing = args.checkpointing
    fuse_projections(model, name.endswith("+proj"))
    if "fused" in name and use_kernels(model, "fused") != "fused":
        return "the fused kernels cannot run here (see the message above)"
    if "compiled" in name and not compile_blocks(model):  # after fuse_projections: it is traced
        return "torch.compile is unsupported here (see the message above)"
    return model, model.loss, lambda: {n: p.grad for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------ validation and timing

def loss_and_grads(module, loss_fn, batch, autocast: bool, device: torch.device):
    module.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(*batch)
    loss.backward()
    return loss.detach().float(), module


def validation_error(loss, grads: dict, ref_loss, ref_grads: dict) -> tuple[float, float, str]:
    """(|loss - eager| / |eager|, worst relative gradient error, the worst parameter)."""
    loss_err = (abs(loss - ref_loss) / abs(ref_loss)).item()
    worst, worst_name = 0.0, ""
    for n, g in ref_grads.items():
        err = ((grads[n].float() - g.float()).norm() / g.float().norm().clamp(min=1e-30)).item()
        if err > worst:
            worst, worst_name = err, n
    return loss_err, worst, worst_name


def time_steps(module, loss_fn, batch, args: argparse.Namespace, device: torch.device, autocast: bool) -> list[float]:
    optimizer = AdamW8bit(module.parameters(), lr=1e-5) if args.optimizer else None
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(*batch)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        module.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    precision = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    param_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = precision == "autocast"
    compute_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    tol = TOLERANCE[compute_dtype]
    torch.manual_seed(0)

    config = get_config(args.model, **({"n_layers": args.layers} if args.layers else {}))
    base = build_model(config, seed=0, device=device, dtype=param_dtype)
    reference, ref_loss_fn, _ = make_provider("eager", base, args)
    tokens = torch.randint(0, reference.config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    batch = (tokens[:, :-1], tokens[:, 1:])
    ref_loss, _ = loss_and_grads(reference, ref_loss_fn, batch, autocast, device)
    ref_grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters()}
    n_tokens = args.batch_size * args.seq_len
    flops = flops_per_step(reference, n_tokens, args.seq_len)
    peak = measure_peak_tflops(device, compute_dtype) if args.measure_peak else (args.peak_tflops or
                                                                                  default_peak_tflops(device))
    results = {"model": args.model, "layers": reference.config.n_layers, "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "precision": precision, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "optimizer": "AdamW8bit" if args.optimizer else None, "checkpointing": args.checkpointing,
               "parameters": reference.num_parameters(), "matmul_parameters": matmul_parameters(reference),
               "flops_per_step": flops, "peak_tflops": peak, "peak_measured": args.measure_peak,
               "eager_loss": ref_loss.item(), "providers": {}}
    say(f"{args.model} x{reference.config.n_layers} layers, {reference.num_parameters() / 1e6:.1f}M parameters, "
        f"{precision}, batch {args.batch_size} x {args.seq_len} on {results['device_name']}; "
        f"{flops / 1e12:.3f} TFLOP per step; peak {peak or 'unknown'} TFLOP/s")
    del reference, ref_loss_fn

    for name in args.providers.split(","):
        made = make_provider(name, base, args)
        if isinstance(made, str):
            say(f"{name:15s} skipped: {made}")
            results["providers"][name] = {"skipped": made}
            continue
        module, loss_fn, grads = made
        loss, _ = loss_and_grads(module, loss_fn, batch, autocast, device)
        loss_err, grad_err, worst = validation_error(loss, grads(), ref_loss, ref_grads)
        entry = {"loss": loss.item(), "loss_rel_error": loss_err, "grad_rel_error": grad_err, "worst_grad": worst}
        if loss_err > tol or grad_err > tol:
            say(f"{name:15s} NOT TIMED: loss off by {loss_err:.2e}, gradient of {worst} by {grad_err:.2e} "
                f"(tolerance {tol:.0e})")
            entry["valid"] = False
            results["providers"][name] = entry
            continue
        times = time_steps(module, loss_fn, batch, args, device, autocast)
        step = statistics.median(times)
        entry.update(valid=True, step_ms=step * 1e3, tokens_per_s=n_tokens / step,
                     tflops=flops / step / 1e12, mfu=(flops / step / 1e12 / peak) if peak else None)
        results["providers"][name] = entry
        mfu = f", MFU {entry['mfu']:.1%}" if peak else ""
        say(f"{name:15s} {step * 1e3:9.2f} ms/step  {n_tokens / step:12,.0f} tokens/s  "
            f"{flops / step / 1e12:8.2f} TFLOP/s{mfu}  (loss err {loss_err:.1e}, grad err {grad_err:.1e})")
        del module, loss_fn, grads, made
        if device.type == "cuda":
            torch.cuda.empty_cache()

    timed = {n: e for n, e in results["providers"].items() if e.get("valid")}
    if "llama" in timed:
        for n, e in timed.items():
            e["speedup_vs_llama"] = e["tokens_per_s"] / timed["llama"]["tokens_per_s"]
        best = max((n for n in timed if n != "llama"), key=lambda n: timed[n]["tokens_per_s"], default=None)
        if best:
            say(f"best astrobio provider {best}: {timed[best]['speedup_vs_llama']:.2f}x transformers' Llama")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if any(e.get("valid") is False for e in results["providers"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
