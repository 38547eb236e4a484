"""The LM head and its cross-entropy, chunked over tokens: ``astrobio::linear_cross_entropy``.

Specification (``linear_cross_entropy_reference``): the mean over the tokens whose target is not
``ignore_index`` of ``logsumexp(logits) - logits[target]``, logits = hidden @ weight.T in fp32.

Eager PyTorch materialises the logits of every token, their fp32 copy, the fp32 log-probabilities and
in the backward two more fp32 tensors of that size (12 bytes per logit; a 13B model's 32768-word vocab
over 8192 tokens is 3 GiB). Here the forward goes ``chunk_tokens`` tokens at a time: the head's matrix
product gives one chunk's logits in the activations' dtype, one row kernel turns them in place into
the row's loss and the gradient of the logits ((softmax - onehot) / valid tokens, fp32 arithmetic),
and two matrix products fold that gradient into the gradients of the hidden states and of the head
weight (accumulated in fp32 over the chunks). The forward so returns the gradients with the loss;
autograd's backward only scales them by the loss's incoming gradient. Without gradients (evaluation)
the row kernel computes the loss only. Peak extra memory: one chunk of logits, the hidden gradient and
an fp32 head-weight gradient.

The row step is a Triton kernel on CUDA (or on CPU tensors under TRITON_INTERPRET=1) and the same
arithmetic in PyTorch elsewhere, so the chunked loss also saves memory on a CPU without Triton.
"""

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch row step serves every device
    triton = None

DEFAULT_CHUNK_LOGITS = 1 << 26  # logits per chunk: 128 MiB in bf16


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=ignore_index)


def triton_row_step_available(device: torch.device) -> bool:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and (device.type == "cuda" or (device.type == "cpu" and interpreted))


if triton is not None:
    @triton.jit
    def _cross_entropy_rows_kernel(logits_ptr, targets_ptr, loss_ptr, scale_ptr, n_cols, ignore_index,
                                   WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """One row: its loss, and (WITH_GRAD) its logits replaced by (softmax - onehot) * scale."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * n_cols
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, n_cols, BLOCK):  # online logsumexp over the row
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        safe_target = tl.where(valid, target, 0)
        target_logit = tl.load(base + safe_target).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
        if WITH_GRAD:
            scale = tl.where(valid, tl.load(scale_ptr), 0.0)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                grad = (tl.exp(x - lse) - tl.where(cols == safe_target, 1.0, 0.0)) * scale
                tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)


def _row_step_torch(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor,
                    ignore_index: int, with_grad: bool) -> None:
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    loss.copy_(torch.where(valid, lse - x.gather(1, safe[:, None])[:, 0], 0.0))
    if with_grad:
        grad = torch.exp(x - lse[:, None])
        grad[torch.arange(len(safe), device=x.device), safe] -= 1.0
        logits.copy_(grad * (scale * valid)[:, None])


def _row_step(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor,
              ignore_index: int, with_grad: bool) -> None:
    if not triton_row_step_available(logits.device):
        _row_step_torch(logits, targets, loss, scale, ignore_index, with_grad)
        return
    n_rows, n_cols = logits.shape
    block = min(triton.next_power_of_2(n_cols), 4096)
    _cross_entropy_rows_kernel[(n_rows,)](logits, targets, loss, scale, n_cols, ignore_index, WITH_GRAD=with_grad,
                                          BLOCK=block, num_warps=8 if block >= 2048 else 4)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, with fp32 accumulation where the device has it for low-precision inputs."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.add_(torch.mm(a, b).float())


@torch.library.custom_op("astrobio::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 ignore_index: int, chunk_tokens: int,
                                 with_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss fp32, d loss / d hidden, d loss / d weight); the gradients are empty without with_grads.
    hidden [N, d] and weight [V, d] of one dtype, targets [N] int64."""
    n = hidden.shape[0]
    valid = (targets != ignore_index).sum()
    scale = 1.0 / valid.clamp(min=1).float()
    losses = torch.empty(n, device=hidden.device, dtype=torch.float32)
    dhidden = torch.empty_like(hidden) if with_grads else hidden.new_empty(0)
    dweight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if with_grads else None
    for start in range(0, n, chunk_tokens):
        h = hidden[start:start + chunk_tokens]
        logits = h @ weight.T
        _row_step(logits, targets[start:start + chunk_tokens], losses[start:start + chunk_tokens], scale.view(1),
                  ignore_index, with_grads)
        if with_grads:
            torch.mm(logits, weight, out=dhidden[start:start + chunk_tokens])
            _add_product(dweight, logits.T, h)
    loss = losses.sum() * scale
    return loss, dhidden, (dweight.to(weight.dtype) if with_grads else weight.new_empty(0))


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, targets, ignore_index, chunk_tokens, with_grads):
    loss = hidden.new_empty((), dtype=torch.float32)
    if with_grads:
        return loss, torch.empty_like(hidden), torch.empty_like(weight)
    return loss, hidden.new_empty(0), weight.new_empty(0)


def _setup_context(ctx, inputs, output):
    _, dhidden, dweight = output
    ctx.save_for_backward(dhidden, dweight)


def _backward(ctx, dloss, _dhidden, _dweight):
    dhidden, dweight = ctx.saved_tensors
    if dhidden.numel() == 0 and dweight.numel() == 0:
        raise RuntimeError("linear_cross_entropy: backward through a loss computed without gradients; "
                           "compute it with torch.is_grad_enabled() and inputs that require grad")
    return (dhidden * dloss).to(dhidden.dtype), (dweight * dloss).to(dweight.dtype), None, None, None, None


linear_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_tokens: int | None = None) -> torch.Tensor:
    """``linear_cross_entropy_reference`` over hidden [..., d], weight [V, d], targets [...], chunked.

    Under autocast, hidden and weight are cast to the autocast dtype first, as nn.Linear would be."""
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                         f"targets {tuple(targets.shape)} must be [..., d], [vocab, d] and [...]")
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    if chunk_tokens is None:
        chunk_tokens = max(1, DEFAULT_CHUNK_LOGITS // weight.shape[0])
    if chunk_tokens < 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be >= 1, got {chunk_tokens}")
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, _, _ = torch.ops.astrobio.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        targets.reshape(-1).long().contiguous(), ignore_index, chunk_tokens, with_grads)
    return loss
