"""One memory layout end to end: channels-last for every 2D and 3D tensor, or contiguous.

cuDNN's tensor-core convolutions work in NHWC / NDHWC. With contiguous (NCHW) weights and
activations every convolution converts its operands there and back: on an H200 at the
``paper`` preset 2,064 such conversions took 50 ms of a 460 ms CVAA-GAN step
(docs/performance.md). ``model.to(memory_format=torch.channels_last_3d)`` cannot fix that
for the two-view generators, whose 2D encoders hold 4-D weights ("required rank 5 tensor
to use channels_last_3d format"); :func:`to_memory_format` converts each tensor by its
rank instead. The layers keep the layout they are given (:class:`~cvaa.models.blocks.
InstanceNorm` instead of PyTorch's, which copies to contiguous), so converting the
parameters and the inputs is enough::

    fmt = resolve_memory_format(cfg.train.memory_format, device)   # before DDP wrapping
    to_memory_format(generator, fmt)
    xrays = tensor_to_memory_format(xrays, fmt)

A converted model computes the same function; its ``state_dict`` holds the same keys and
values (strided differently) and loads into a model of either layout.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

MemoryFormat = Literal["auto", "contiguous", "channels_last"]
MEMORY_FORMATS: tuple[str, ...] = ("auto", "contiguous", "channels_last")


def resolve_memory_format(fmt: str, device: torch.device) -> Literal["contiguous", "channels_last"]:
    """``auto`` -> ``channels_last`` on CUDA, ``contiguous`` elsewhere; others as given.

    Example:
        >>> resolve_memory_format("auto", torch.device("cpu"))
        'contiguous'
    """
    if fmt not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {list(MEMORY_FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        return "channels_last" if device.type == "cuda" else "contiguous"
    return fmt  # type: ignore[return-value]


def torch_memory_format(fmt: str, rank: int) -> torch.memory_format:
    """The ``torch.memory_format`` for a tensor of ``rank`` dims: channels-last is
    ``channels_last`` for 4-D, ``channels_last_3d`` for 5-D, contiguous for the rest."""
    if fmt not in ("contiguous", "channels_last"):
        raise ValueError(f"fmt must be 'contiguous' or 'channels_last' (resolve 'auto' with "
                         f"resolve_memory_format first), got {fmt!r}")
    if fmt == "channels_last" and rank == 4:
        return torch.channels_last
    if fmt == "channels_last" and rank == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def tensor_to_memory_format(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` in layout ``fmt`` (a no-op when it already is; 1-channel tensors usually are).

    Example:
        >>> x = tensor_to_memory_format(torch.zeros(1, 2, 3, 3), "channels_last")
        >>> x.is_contiguous(memory_format=torch.channels_last)
        True
    """
    return x.contiguous(memory_format=torch_memory_format(fmt, x.dim()))


def to_memory_format(module: nn.Module, fmt: str) -> nn.Module:
    """Convert every parameter and buffer of ``module`` to layout ``fmt``, in place.

    4-D tensors (2D conv weights) become ``channels_last``, 5-D ones (3D conv weights)
    ``channels_last_3d``, others stay as they are. Call it before the optimiser and the
    DDP wrapper are built (both hold the parameters as they are then); ``Module.to(device)``
    afterwards keeps the layout.

    Args:
        module: a generator or discriminator (any ``nn.Module``).
        fmt: ``contiguous`` or ``channels_last`` (:func:`resolve_memory_format`).

    Returns:
        ``module``, for chaining.

    Example:
        >>> from cvaa.models.blocks import ConvNormAct
        >>> m = to_memory_format(ConvNormAct(3, 2, 8), "channels_last")
        >>> m.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        True
    """
    torch_memory_format(fmt, 0)                       # validates fmt
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.contiguous(memory_format=torch_memory_format(fmt, p.dim()))
            if p.grad is not None:
                p.grad = p.grad.contiguous(memory_format=torch_memory_format(fmt, p.dim()))
        for sub in module.modules():
            for name, b in sub.named_buffers(recurse=False):
                if b is not None:
                    fmt_b = torch_memory_format(fmt, b.dim())
                    setattr(sub, name, b.contiguous(memory_format=fmt_b))
    return module


__all__ = ["MemoryFormat", "MEMORY_FORMATS", "resolve_memory_format", "torch_memory_format",
           "tensor_to_memory_format", "to_memory_format"]
