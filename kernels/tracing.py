"""What the model's Triton ops share: whether a launch would only be traced.

NOTE: under TRITON_INTERPRET=1, ``torch.library.wrap_triton`` returns the interpreted kernel itself
instead of a traceable wrapper. Fake-tensor propagation (torch.compile's and opcheck's shape checks)
needs only the outputs' shapes and dtypes, which the ops allocate before launching, so the launch is
skipped for fake tensors. AOT tracing (torch.compile's graph capture) would leave the interpreted
kernel out of the graph: that is an error, never a silently wrong graph.
"""

import torch
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor


def launch_needed(t: torch.Tensor) -> bool:
    """False for a fake CPU tensor (the interpreter would read no data)."""
    if t.device.type != "cpu":
        return True
    if isinstance(t, FunctionalTensor):
        raise RuntimeError("the Triton interpreter's kernels cannot be traced by torch.compile; compile on a "
                           "CUDA device, or run the model's fused kernels uncompiled")
    return not is_fake(t)
