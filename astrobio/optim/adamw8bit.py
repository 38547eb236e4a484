"""AdamW8bit: torch.optim.Optimizer front end of the fused 8-bit AdamW (astrobio/spec/adamw8bit.py).

Per parameter the state is ``step`` (int, updates applied), ``exp_avg``/``exp_avg_sq`` (uint8 codes with
``absmax1``/``absmax2``, one fp32 absmax per block of 256 elements; fp32 moments for tensors under
``min_8bit_size`` elements) and nothing else: the quantization maps are the constants
``reference.dynamic_map``. Each parameter is stepped by ``astrobio.ops.adamw8bit_step`` with the backend
that serves its device (``backend="auto"``: the C++ kernel for CPU tensors), or the one named.

- Parameter groups carry their own ``lr``, ``betas``, ``eps``, ``weight_decay``; ``lr`` is read from the
  group at every step, so torch's LR schedulers work unchanged.
- fp32 parameters are their own master weights; bf16 parameters are updated with stochastic rounding,
  seeded per step and parameter by ``step_seed`` (deterministic, the same on every backend).
- ``step(closure=None, grad_scale=1.0, found_inf=None)``: gradients are multiplied by ``grad_scale``
  inside the kernel. If any gradient of the step is non-finite, the whole step is skipped: nothing changes
  and ``skipped_steps`` grows. A caller that knows already (the trainer's clip norm) passes ``found_inf``
  (a bool, or a one-element tensor: nonzero skips) and nothing is scanned. Otherwise the gradients are
  checked without a Python loop over elements: CPU gradients by one native multi-threaded pass
  (``ops.any_non_finite``), GPU gradients by a device-side flag (``device_non_finite_flag``) that the
  kernel reads, so ``step()`` never waits for the GPU. On a GPU a skip decided by that flag is counted on
  the device (``skipped_steps`` reads it when asked) and, since the host does not know, still advances
  ``state["step"]`` (the bias-correction count); pass ``found_inf`` as a bool where that matters.
- ``state_dict()`` holds tensors and ints only, plus ``skipped_steps``; ``load_state_dict`` validates
  every entry against its parameter and moves it to the parameter's device without changing a bit, so a
  state saved from one backend or device continues on another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from astrobio import ops
from astrobio.spec import adamw8bit as reference

_MASK64 = (1 << 64) - 1
_PARAM_DTYPES = (torch.float32, torch.bfloat16)


def step_seed(seed: int, step: int, index: int) -> int:
    """The 32-bit stochastic-rounding seed of parameter ``index`` at ``step`` (a splitmix64 finalizer
    over the three numbers), so that every backend and the offload engine draw the same bits."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0xFFFFFFFF


def check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Raise a clear ValueError for hyperparameters the kernel cannot use."""
    if not (isinstance(lr, (int, float)) or torch.is_tensor(lr)) or not 0.0 <= float(lr) < math.inf:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not float(eps) > 0.0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not 0.0 <= float(weight_decay) < math.inf:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")


def check_parameter(p: torch.Tensor, where: str) -> None:
    """Raise a clear error for a parameter the fused kernel cannot update in place."""
    if p.dtype not in _PARAM_DTYPES:
        raise TypeError(f"{where}: parameter of dtype {p.dtype} is not supported; AdamW8bit steps float32 "
                        f"or bfloat16 parameters (convert the model with .float() or .bfloat16())")
    if p.is_sparse or not p.is_contiguous():
        raise ValueError(f"{where}: parameter of shape {tuple(p.shape)} is not a contiguous dense tensor; the "
                         f"kernel updates memory in place (make it contiguous before building the optimizer)")


def check_gradient(p: torch.Tensor, index: int) -> None:
    """Raise a clear error for a gradient the fused kernel cannot read."""
    g, where = p.grad, f"gradient of parameter {index} (shape {tuple(p.shape)})"
    if g.is_sparse:
        raise RuntimeError(f"{where}: AdamW8bit does not support sparse gradients; use a dense layer "
                           f"(e.g. nn.Embedding(sparse=False))")
    if g.dtype not in _PARAM_DTYPES:
        raise TypeError(f"{where}: dtype {g.dtype} is not supported; gradients must be float32 or bfloat16")
    if g.shape != p.shape or g.device != p.device or not g.is_contiguous():
        raise ValueError(f"{where}: expected a contiguous tensor of the parameter's shape on {p.device}, got "
                         f"shape {tuple(g.shape)} on {g.device} (contiguous={g.is_contiguous()})")


def device_non_finite_flag(grads: list[torch.Tensor]) -> torch.Tensor:
    """A one-element float32 tensor on the gradients' device, 1.0 when any element is inf or NaN, computed
    there without a host synchronization (the max-norm of each gradient is inf or NaN exactly then)."""
    norms = torch._foreach_norm(grads, float("inf"))
    return (~torch.stack(norms).isfinite().all()).to(torch.float32).reshape(1)


def new_state(p: torch.Tensor, min_8bit_size: int) -> dict[str, Any]:
    """Zero moments for ``p``: 8-bit codes + absmax, or fp32 moments when ``p`` is small."""
    if p.numel() >= min_8bit_size:
        blocks = reference.num_blocks(p.numel())
        return {"step": 0,
                "exp_avg": torch.zeros(p.shape, dtype=torch.uint8, device=p.device),
                "exp_avg_sq": torch.zeros(p.shape, dtype=torch.uint8, device=p.device),
                "absmax1": torch.zeros(blocks, dtype=torch.float32, device=p.device),
                "absmax2": torch.zeros(blocks, dtype=torch.float32, device=p.device)}
    return {"step": 0,
            "exp_avg": torch.zeros(p.shape, dtype=torch.float32, device=p.device),
            "exp_avg_sq": torch.zeros(p.shape, dtype=torch.float32, device=p.device)}


def checked_state(p: torch.Tensor, saved: dict[str, Any], where: str) -> dict[str, Any]:
    """A saved per-parameter state validated against ``p`` and moved (bit for bit) to its device."""
    if not isinstance(saved, dict) or "step" not in saved or "exp_avg" not in saved or "exp_avg_sq" not in saved:
        raise ValueError(f"{where}: expected a dict with step, exp_avg, exp_avg_sq (and absmax1, absmax2 for "
                         f"8-bit moments), got {sorted(saved) if isinstance(saved, dict) else type(saved)}")
    step = saved["step"]
    step = int(step.item()) if torch.is_tensor(step) else step
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"{where}: step must be an int >= 0, got {saved['step']!r}")
    dtype = saved["exp_avg"].dtype
    if dtype not in (torch.uint8, torch.float32):
        raise ValueError(f"{where}: exp_avg has dtype {dtype}; expected uint8 codes or float32 moments")
    expected = {"exp_avg": (tuple(p.shape), dtype), "exp_avg_sq": (tuple(p.shape), dtype)}
    if dtype == torch.uint8:
        blocks = reference.num_blocks(p.numel())
        expected.update(absmax1=((blocks,), torch.float32), absmax2=((blocks,), torch.float32))
    extra = set(saved) - set(expected) - {"step"}
    if extra:
        raise ValueError(f"{where}: unexpected state entries {sorted(extra)} for {dtype} moments")
    state: dict[str, Any] = {"step": step}
    for key, (shape, want) in expected.items():
        value = saved.get(key)
        if not torch.is_tensor(value) or tuple(value.shape) != shape or value.dtype != want:
            got = f"{value.dtype} {tuple(value.shape)}" if torch.is_tensor(value) else repr(value)
            raise ValueError(f"{where}: {key} must be a {want} tensor of shape {shape} for a parameter of "
                             f"shape {tuple(p.shape)}, got {got}; was this state saved for another model?")
        state[key] = value.detach().to(device=p.device, copy=True).contiguous()
    return state


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with block-wise 8-bit moments, stepped by the fused kernels of astrobio.ops."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, backend: str = "auto",
                 min_8bit_size: int = reference.MIN_8BIT_NUMEL, seed: int = 0):
        if backend != "auto" and backend not in ops.BACKENDS:
            raise ValueError(f"unknown optimizer backend {backend!r}; choose one of auto, {', '.join(ops.BACKENDS)}")
        if min_8bit_size < 1:
            raise ValueError(f"min_8bit_size must be >= 1, got {min_8bit_size}")
        self.backend = backend
        self.min_8bit_size = int(min_8bit_size)
        self.seed = int(seed)
        self._skipped_on_host = 0
        self._skipped_on_device: torch.Tensor | None = None  # skips decided by a device-side flag
        self._device_backends: dict[torch.device, str] = {}
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        for i, p in enumerate(group["params"]):
            check_parameter(p, f"AdamW8bit param group {len(self.param_groups) - 1}, parameter {i}")
            self._backend_for(p.device)  # fail at construction, not at the first step

    def _backend_for(self, device: torch.device) -> str:
        if device not in self._device_backends:
            self._device_backends[device] = ops.resolve_backend(self.backend, device)
        return self._device_backends[device]

    def _qmaps_for(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._qmaps:
            self._qmaps[device] = (reference.dynamic_map(signed=True).to(device),
                                   reference.dynamic_map(signed=False).to(device))
        return self._qmaps[device]

    def _params_with_grads(self) -> list[tuple[int, dict[str, Any], torch.Tensor]]:
        """(global parameter index, group, parameter) for every parameter that has a gradient."""
        found, index = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    check_gradient(p, index)
                    found.append((index, group, p))
                index += 1
        return found

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reads the device-side count, if any: a synchronization)."""
        on_device = 0 if self._skipped_on_device is None else int(self._skipped_on_device.item())
        return self._skipped_on_host + on_device

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_on_host = int(value)
        self._skipped_on_device = None

    @staticmethod
    def _skip_decision(params: list[tuple[int, dict[str, Any], torch.Tensor]],
                       found_inf: torch.Tensor | bool | None) -> bool | torch.Tensor:
        """True/False decided on the host, or a one-element float32 flag on the (one) GPU the parameters
        live on, which the kernels read there."""
        if found_inf is not None and not torch.is_tensor(found_inf):
            return bool(found_inf)
        devices = {p.device for _, _, p in params}
        on_host = all(d.type == "cpu" for d in devices)
        if found_inf is not None:
            if found_inf.numel() != 1:
                raise ValueError(f"found_inf must be a bool or a one-element tensor, got {found_inf.numel()} "
                                 "elements")
            if on_host or found_inf.device.type == "cpu" or len(devices) > 1:
                return bool(found_inf.reshape(-1)[0] != 0)
            return found_inf.reshape(1).to(device=next(iter(devices)), dtype=torch.float32)
        if on_host:
            return ops.any_non_finite([p.grad for _, _, p in params])
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for _, _, p in params:
            by_device.setdefault(p.device, []).append(p.grad)
        flags = {d: ops.any_non_finite(g) if d.type == "cpu" else device_non_finite_flag(g)
                 for d, g in by_device.items()}
        if len(flags) == 1:
            return next(iter(flags.values()))
        return any(bool(flag) for flag in flags.values())  # parameters on several devices: decided on the host

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, grad_scale: float = 1.0,
             found_inf: torch.Tensor | bool | None = None) -> Any:
        """One update of every parameter that has a gradient; returns the closure's loss, if any.

        ``grad_scale`` multiplies every gradient inside the kernel (e.g. 1/accumulation or a clipping
        coefficient). ``found_inf``, when given, decides the skip instead of a check of the gradients: a
        bool, or a one-element tensor (nonzero skips; on the GPU the parameters live on, the kernels read
        it there, without a synchronization).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not math.isfinite(float(grad_scale)):
            raise ValueError(f"grad_scale must be finite, got {grad_scale}")
        for group in self.param_groups:  # a scheduler may have set lr: check before any parameter changes
            check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        params = self._params_with_grads()
        skip = self._skip_decision(params, found_inf)
        flag = skip if torch.is_tensor(skip) else None
        if flag is None and skip:
            self._skipped_on_host += 1
            return loss
        if flag is not None:
            counted = self._skipped_on_device
            self._skipped_on_device = flag.clone() if counted is None else counted + flag
        for index, group, p in params:
            self._step_parameter(index, group, p, float(grad_scale), flag)
        return loss

    def _step_parameter(self, index: int, group: dict[str, Any], p: torch.Tensor, grad_scale: float,
                        found_inf: torch.Tensor | None) -> None:
        state = self.state[p]
        if not state:
            state.update(new_state(p, self.min_8bit_size))
        state["step"] += 1
        qmap1, qmap2 = self._qmaps_for(p.device)
        if state["exp_avg"].dtype == torch.uint8:
            absmax1, absmax2 = state["absmax1"], state["absmax2"]
        else:
            absmax1 = absmax2 = torch.empty(0, dtype=torch.float32, device=p.device)
        beta1, beta2 = group["betas"]
        ops.adamw8bit_step(self._backend_for(p.device), p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                           absmax1, absmax2, qmap1, qmap2, None, found_inf, float(group["lr"]), beta1, beta2,
                           group["eps"], group["weight_decay"], grad_scale, state["step"],
                           step_seed(self.seed, state["step"], index))

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (``state`` by parameter index, ``param_groups``) plus ``skipped_steps``."""
        saved = super().state_dict()
        saved["skipped_steps"] = self.skipped_steps
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by AdamW8bit (any backend or device); every entry is checked first, so a
        mismatched state raises and leaves this optimizer unchanged."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups) if isinstance(groups, list) else 'no'} param "
                             f"groups but this optimizer has {len(self.param_groups)}")
        params = [p for group in self.param_groups for p in group["params"]]
        for g, (saved, own) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(f"param group {g} of the state dict has {len(saved['params'])} parameters but "
                                 f"this optimizer's has {len(own['params'])}")
            check_hyperparameters(saved["lr"], saved["betas"], saved["eps"], saved["weight_decay"])
        ids = [i for saved in groups for i in saved["params"]]
        position = {saved_id: n for n, saved_id in enumerate(ids)}
        new: dict[torch.Tensor, dict[str, Any]] = {}
        for saved_id, saved in state_dict.get("state", {}).items():
            if saved_id not in position:
                raise ValueError(f"the state dict has state for parameter id {saved_id}, which no param group lists")
            p = params[position[saved_id]]
            new[p] = checked_state(p, saved, f"state of parameter {position[saved_id]} (shape {tuple(p.shape)})")
        for saved, own in zip(groups, self.param_groups):
            own.update({k: v for k, v in saved.items() if k != "params"})
            own["betas"] = tuple(own["betas"])
        self.state.clear()
        self.state.update(new)
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
