"""Cross-view fusion of the decoder: VAA, FD and the CVAA module (paper II.A.2).

At each decoder scale below the deepest, the inputs are the two views' shallow features
``F1`` (PA) and ``F2`` (lateral), already expanded to 3D in the shared frame, and the deep
features ``U`` up-convolved from the previous decoder level; all are ``(B, C, D, H, W)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import ConcatConv, ConvNormAct, CpuConv, UpConv


def _check_channels(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class ViewAttentionAlignment(nn.Module):
    """View Attention Alignment (VAA): per-voxel softmax weights over the two views.

    ``S_i = ReLU(Conv3d(cat(U, F_i)))`` (structure-aware view features, one conv per view);
    ``M = Conv3d(cat(S_1, S_2), k=7, p=3, out=2)``; ``W = softmax(M)`` over the 2 channels;
    ``coarse = W_0 * F_1 + W_1 * F_2``.

    Args:
        channels: channels of ``U``, ``F_1``, ``F_2`` (and of ``coarse``).
        cpu_conv: CPU path of the 7^3 conv: ``auto``, ``fft`` or ``direct`` (``ConcatConv``).

    Example:
        >>> x = torch.rand(1, 4, 6, 6, 6)
        >>> ViewAttentionAlignment(4)(x, x, x).shape
        torch.Size([1, 4, 6, 6, 6])
    """

    def __init__(self, channels: int, cpu_conv: CpuConv = "auto") -> None:
        super().__init__()
        _check_channels(channels=channels)
        # Convs over channel concatenations take the parts separately (``ConcatConv``):
        # same function and weights, without materialising the concatenation.
        self.structure = nn.ModuleList(
            ConvNormAct(3, (channels, channels), channels, norm=False) for _ in range(2))
        self.mix = ConcatConv(3, (channels, channels), 2, kernel_size=7, padding=3,
                              cpu_conv=cpu_conv)

    def weights(self, u: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(B, 2, D, H, W)``; they sum to 1 at every voxel."""
        s1 = self.structure[0](u, f1)                  # ReLU(Conv3d(cat(U, F1))), (B, C, D, H, W)
        s2 = self.structure[1](u, f2)                  # ReLU(Conv3d(cat(U, F2)))
        return torch.softmax(self.mix(s1, s2), dim=1)  # (B, 2, D, H, W)

    def forward(self, u: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """Coarse features ``(B, C, D, H, W)``."""
        w = self.weights(u, f1, f2)
        return w[:, 0:1] * f1 + w[:, 1:2] * f2


class FineDistillation(nn.Module):
    """Fine Distillation (FD): a per-voxel gate in (0, 1) on the coarse features.

    ``fine = sigmoid(Conv3d(cat(coarse, U), k=3, p=1, out=1)) * coarse``.

    Args:
        channels: channels of ``coarse`` and ``U``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        _check_channels(channels=channels)
        self.gate = ConcatConv(3, (channels, channels), 1, kernel_size=3, padding=1)

    def weights(self, coarse: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Distillation weights ``(B, 1, D, H, W)`` in (0, 1)."""
        return torch.sigmoid(self.gate(coarse, u))     # sigmoid(Conv3d(cat(coarse, U)))

    def forward(self, coarse: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Fine features ``(B, C, D, H, W)``."""
        return self.weights(coarse, u) * coarse


class CVAAModule(nn.Module):
    """One decoder level: VAA + FD, then ``UpConv(Conv3dBlock(cat(coarse, fine, F1+F2, U)))``.

    The addition-fused ``F1 + F2`` keeps the traditional view alignment for feature
    diversity and ``U`` acts as a residual path (paper II.A.2).

    Args:
        channels: channels ``C`` of ``U``, ``F_1``, ``F_2``.
        out_channels: channels after the up-convolution; ``None`` for the full-resolution
            level, which has no up-convolution.
        checkpoint: recompute VAA, FD and the merge in the backward pass instead of keeping
            their activations (trades about a third more compute for memory).
        cpu_conv: CPU path of VAA's 7^3 conv (``ViewAttentionAlignment``).

    Example:
        >>> x = torch.rand(1, 4, 6, 6, 6)
        >>> CVAAModule(4, 2)(x, x, x).shape
        torch.Size([1, 2, 12, 12, 12])
    """

    def __init__(self, channels: int, out_channels: int | None,
                 checkpoint: bool = False, cpu_conv: CpuConv = "auto") -> None:
        super().__init__()
        _check_channels(channels=channels)
        if out_channels is not None:
            _check_channels(out_channels=out_channels)
        self.vaa = ViewAttentionAlignment(channels, cpu_conv)
        self.fd = FineDistillation(channels)
        self.block = ConvNormAct(3, (channels,) * 4, channels)
        self.up = UpConv(3, channels, out_channels) if out_channels is not None else nn.Identity()
        self.checkpoint = checkpoint

    def _merge(self, coarse: torch.Tensor, fine: torch.Tensor, f1: torch.Tensor,
               f2: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.up(self.block(coarse, fine, f1 + f2, u))  # Conv3dBlock(cat(...))

    def forward(self, u: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) x 3 -> (B, out_channels, 2D, 2H, 2W) (or (B, C, D, H, W))."""
        if self.checkpoint and torch.is_grad_enabled():
            # Each part separately: only the part being back-propagated is ever rebuilt.
            coarse = checkpoint(self.vaa, u, f1, f2, use_reentrant=False)
            fine = checkpoint(self.fd, coarse, u, use_reentrant=False)
            return checkpoint(self._merge, coarse, fine, f1, f2, u, use_reentrant=False)
        coarse = self.vaa(u, f1, f2)
        fine = self.fd(coarse, u)
        return self._merge(coarse, fine, f1, f2, u)


@torch.no_grad()
def view_attention(generator: nn.Module, xrays) -> list[np.ndarray]:
    """CVAA's view-attention weights at each decoder scale, coarsest first.

    Forward hooks on every :class:`ViewAttentionAlignment` recompute
    its softmax weights from the inputs it received (the model is not changed).

    Args:
        generator: a CVAA generator (any model with VAA modules).
        xrays: ``(2, P, P)``.

    Returns:
        ``[(2, s, s, s)]``: channel 0 the PA's weight, 1 the lateral's (they sum to 1).
    """
    found: list[np.ndarray] = []

    def hook(module, inputs, _output):
        found.append(module.weights(*inputs)[0].float().cpu().numpy())

    modules = [m for m in generator.modules() if isinstance(m, ViewAttentionAlignment)]
    if not modules:
        raise ValueError(f"{type(generator).__name__} has no view-attention modules")
    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = generator.training
    generator.eval()
    try:
        x = torch.as_tensor(np.asarray(xrays, np.float32) if not torch.is_tensor(xrays)
                            else xrays).float()
        generator(x[None].to(next(generator.parameters()).device))
    finally:
        generator.train(was_training)
        for h in handles:
            h.remove()
    return found


__all__ = ["ViewAttentionAlignment", "FineDistillation", "CVAAModule", "view_attention"]
