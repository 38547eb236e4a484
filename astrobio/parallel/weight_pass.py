"""The split backward of ZB-H1: ``B`` computes the gradient of the stage input (and of the parameters
outside ``nn.Linear`` modules), ``W`` each Linear's weight gradients, later.

During a forward, a hook on every Linear records the call (``LinearCall``): its input, and a tensor
hook on its output catches the output's gradient when ``B`` runs. ``W`` then computes each weight
gradient as one GEMM of the two (what Linear's backward does) and accumulates them all into ``.grad``
with one autograd call, so post-accumulate-grad hooks fire as in a whole backward.

A Linear whose forward did not run during F (its weight used directly, as a chunked cross-entropy uses
the head's) has no call to defer: B computes its weights' gradients with the others outside Linear
calls.

Under activation checkpointing (``module.gradient_checkpointing``) no Linear input is kept (that would
undo the recomputation's memory saving): ``B`` keeps the graph, and ``W`` runs backward from each Linear
output's autograd edge to its weights, recomputing a checkpointed block once more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge


@dataclass(eq=False)
class LinearCall:
    """One Linear call of one micro-batch: its input (``None`` under checkpointing, where W goes back
    through the output's autograd edge instead), its weights, and the gradient of its output that B
    caught."""

    module: nn.Linear
    edge: GradientEdge | None
    input: torch.Tensor | None
    params: list[nn.Parameter]
    grad: torch.Tensor | None = None
    version: int | None = field(init=False)

    def __post_init__(self):
        self.version = None if self.input is None else self.input._version

    def catch(self, grad: torch.Tensor) -> None:
        self.grad = grad

    def weight_grads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, gradient) of this call, as Linear's backward computes them: one GEMM (and a sum
        for the bias) on the flattened output gradient and input."""
        if self.input._version != self.version:
            raise RuntimeError(f"the input of {self.module} was modified in place after its forward; ZB-H1's "
                               "weight pass needs it unchanged (use 1f1b for this model)")
        go = self.grad.reshape(-1, self.grad.shape[-1])
        x = self.input.reshape(-1, self.input.shape[-1]).to(go.dtype)
        out = []
        if self.module.weight.requires_grad:
            out.append((self.module.weight, go.t().mm(x).to(self.module.weight.dtype)))
        bias = self.module.bias
        if bias is not None and bias.requires_grad:
            out.append((bias, go.sum(0).to(bias.dtype)))
        return out


class WeightSplit:
    """Records each nn.Linear call of a stage's forward, and runs the two halves of its backward."""

    def __init__(self, module: nn.Module):
        self.keep_inputs = not getattr(module, "gradient_checkpointing", False)
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        deferred = {id(p) for lin in linears for p in lin.parameters()}
        self.early_params = [p for p in module.parameters() if p.requires_grad and id(p) not in deferred]
        self.linears = linears
        self.recording: list[LinearCall] | None = None  # the calls of the forward running now
        self.handles = [lin.register_forward_hook(self.record) for lin in linears]

    def record(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        # NOTE: off outside the executor's F, so a checkpointed block's recomputation in B adds nothing.
        if self.recording is None or not output.requires_grad:
            return
        if any(call.module is module for call in self.recording):
            raise RuntimeError(f"{type(module).__name__} {module} ran twice in one forward; ZB-H1's weight "
                               "pass needs each Linear once per micro-batch (use 1f1b for this model)")
        kept = inputs[0] if self.keep_inputs else None
        edge = None if self.keep_inputs else get_gradient_edge(output)
        call = LinearCall(module, edge, kept, [p for p in module.parameters() if p.requires_grad])
        output.register_hook(call.catch)
        self.recording.append(call)

    def input_backward(self, root, grad: torch.Tensor | None, stage_input: torch.Tensor,
                       calls: list[LinearCall]) -> None:
        """B: the backward to the stage input, the parameters outside Linear modules and those of the
        Linear modules not called in this micro-batch's forward (``calls``: the ones that were). W needs
        the graph again only when it goes back through the Linear outputs' edges (under checkpointing)."""
        called = {id(call.module) for call in calls}
        uncalled = [p for lin in self.linears if id(lin) not in called for p in lin.parameters() if p.requires_grad]
        torch.autograd.backward([root], None if grad is None else [grad], retain_graph=not self.keep_inputs,
                                inputs=[stage_input] + self.early_params + uncalled)

    def weight_backward(self, calls: list[LinearCall]) -> None:
        """W: the weight gradients of one micro-batch's Linear calls, accumulated into ``.grad``."""
        if self.keep_inputs:
            # one GEMM per Linear (recording no graph: the inputs still require grad), then one autograd
            # call that accumulates every gradient into .grad
            with torch.no_grad():
                pairs = [pair for call in calls for pair in call.weight_grads()]
            torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])
        else:
            # NOTE: one backward per Linear, reaching only its own weights: from all outputs at once the
            # engine would also carry each output's gradient on through earlier layers to their weights.
            for call in calls:
                torch.autograd.backward([call.edge], [call.grad], inputs=call.params)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
