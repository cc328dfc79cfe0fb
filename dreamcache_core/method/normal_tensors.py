"""Objects that outlive a ComfyUI prompt hold normal tensors, not inference tensors.

ComfyUI's executor runs every prompt inside ``torch.inference_mode()``. A tensor
created there is an *inference tensor*: it has no version counter (reading
``_version`` raises), it cannot be changed in place once inference mode is left,
and autograd refuses to save it for backward. The adapter, the reference cache
and the device copies memoised by an injection are made by one node, kept by
ComfyUI's cache across prompts, and may be trained from later (a loaded adapter
as ``--init-adapter``, a cache in the training loss). So everything of that kind
is built inside ``normal_tensors()``, and inputs that may be inference tensors
go through ``as_normal``.

Nothing here reads a version counter of an inference tensor: ``parameters_state``
gives the token by which memoised values (the memory keys and values) know that
the weights they were computed from have changed.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def normal_tensors() -> Iterator[None]:
    """Leave inference mode for the block (tensors made in it are normal), keeping the grad mode as it was.

    ``torch.inference_mode(False)`` alone switches gradients on; inside ComfyUI's prompt they were off and stay off.
    """
    grad_enabled = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad_enabled):
        yield


def as_normal(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when it is a normal tensor, else a normal copy (call inside ``normal_tensors()``)."""
    if tensor.is_inference():
        with normal_tensors():
            return tensor.clone()
    return tensor


def parameters_state(module: torch.nn.Module) -> tuple:
    """A token that changes whenever a parameter of ``module`` is replaced or changed in place.

    Per parameter: its storage address and its version counter. An inference tensor has no version counter;
    it can only be changed in place inside inference mode (nothing in this pack does that), so its address,
    shape and dtype identify its state.
    """
    state = []
    for parameter in module.parameters():
        version = -1 if parameter.is_inference() else parameter._version
        state.append((parameter.data_ptr(), version, tuple(parameter.shape), parameter.dtype, parameter.device))
    return tuple(state)
