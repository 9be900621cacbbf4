"""X-ray encoder (Feat2D) and the 2D -> 3D back-projection expansion (paper II.A.1).

Axis conventions (volumes ``(B, C, D, H, W)``, D superior->inferior, H anterior->posterior,
W patient right->left; X-ray rows run along D):

- PA view: image columns run along W, so the PA projects along H; its features are
  repeated along H.
- Lateral view: image columns run along H, so it projects along W; its features are
  repeated along W.

With that, both expanded features already live in the shared (D, H, W) frame: the
"transform into a unified coordinate space" of the paper is the choice of repeat axis.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from .blocks import Conv2d, ConvNormAct, DenseBlock, instance_norm

ProjectionAxis = Literal["H", "W"]

# The projection axis of each view (channel 0 = PA, channel 1 = lateral).
VIEW_AXES: tuple[ProjectionAxis, ProjectionAxis] = ("H", "W")


def expand_along(plane: torch.Tensor, axis: ProjectionAxis, size: int) -> torch.Tensor:
    """Repeat a view's 2D map along its projection axis (a stride-0 view, no copy).

    Args:
        plane: ``(B, C, D, N)``: rows along D, columns along the view's in-plane axis
            (W for the PA view, H for the lateral view).
        axis: ``"H"`` (PA) or ``"W"`` (lateral), the axis that is repeated.
        size: extent of the repeated axis.

    Returns:
        ``(B, C, D, size, N)`` for ``H`` or ``(B, C, D, N, size)`` for ``W``.

    Example:
        >>> expand_along(torch.zeros(1, 3, 4, 5), "H", 6).shape
        torch.Size([1, 3, 4, 6, 5])
    """
    if plane.dim() != 4:
        raise ValueError(f"plane must be (B, C, D, N), got shape {tuple(plane.shape)}")
    if axis == "H":
        return plane.unsqueeze(3).expand(-1, -1, -1, size, -1)
    if axis == "W":
        return plane.unsqueeze(4).expand(-1, -1, -1, -1, size)
    raise ValueError(f"axis must be 'H' or 'W', got {axis!r}")


class Expand2Dto3D(nn.Module):
    """2D feature map -> 3D feature volume by back-projection (paper II.A.1, "2D => 3D").

    Computes ``ReLU(IN(Conv3d_3x3x3(repeat(Conv2d_1x1(x)))))`` where the repeat runs along
    the view's projection axis and the 3^3 conv pads that axis by replication (the
    repeated field continues beyond the volume, as the back-projection assumes) and the
    other two by zeros. On a field that is constant along an axis, such a conv equals a
    3x3 conv2d whose kernel is the 3^3 kernel summed along that axis, and instance-norm
    statistics over the volume equal those over the plane. So the module stores that
    summed 3x3 kernel and works on the plane: the same function as the 3D version at
    1/size of its compute and activation memory, and the result is exactly constant along
    the projection axis (returned as a stride-0 view).

    Args:
        in_channels: channels of the 2D feature map.
        out_channels: channels of the 3D feature volume.
        axis: ``"H"`` for the PA view, ``"W"`` for the lateral view.

    Example:
        >>> Expand2Dto3D(16, 8, "H")(torch.zeros(2, 16, 4, 4)).shape
        torch.Size([2, 8, 4, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, axis: ProjectionAxis) -> None:
        super().__init__()
        if axis not in ("H", "W"):
            raise ValueError(f"axis must be 'H' (PA) or 'W' (lateral), got {axis!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.axis: ProjectionAxis = axis
        self.reduce = Conv2d(in_channels, out_channels, 1, bias=False)
        # The 3^3 kernel summed along the projection axis (see the class docstring).
        self.conv = Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm = instance_norm(2, out_channels)
        self.act = nn.ReLU(inplace=True)

    def plane(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, N) -> (B, C_out, D, N): one slice of the expanded volume."""
        return self.act(self.norm(self.conv(self.reduce(x))))

    def forward(self, x: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(B, C_in, D, N) -> (B, C_out, D, H, W), constant along the projection axis.

        ``size`` is the extent of the projection axis (default: cubic, ``N``).
        """
        return expand_along(self.plane(x), self.axis, x.shape[-1] if size is None else size)


class Feat2D(nn.Module):
    """DenseNet encoder of one X-ray view (paper II.A.1 "Feat2D"; X2CT-GAN's layout).

    Stem conv 7x7 + IN + ReLU at full resolution, then per stage: IN-ReLU-conv 3x3
    stride 2 (downsample), a DenseNet-BC block (growth ``growth``, bottleneck
    ``4 * growth``) and an IN-ReLU-conv 1x1 transition to ``out_channels[i]``.

    Args:
        in_channels: X-ray channels (1).
        stem_channels: channels of the stem.
        growth: DenseNet growth rate.
        dense_layers: layers per stage (X2CT-GAN: 6, 12, 24, 16, 6).
        out_channels: channels after each stage's transition.
        bottleneck: bottleneck width as a multiple of ``growth``.

    Example:
        >>> feats = Feat2D(1, 8, 4, (1, 1), (16, 24))(torch.zeros(1, 1, 32, 32))
        >>> [tuple(f.shape) for f in feats]
        [(1, 8, 32, 32), (1, 16, 16, 16), (1, 24, 8, 8)]
    """

    def __init__(self, in_channels: int = 1, stem_channels: int = 64, growth: int = 32,
                 dense_layers: Sequence[int] = (6, 12, 24, 16, 6),
                 out_channels: Sequence[int] = (128, 256, 512, 512, 512),
                 bottleneck: int = 4) -> None:
        super().__init__()
        if len(dense_layers) != len(out_channels) or not dense_layers:
            raise ValueError(f"dense_layers {tuple(dense_layers)} and out_channels "
                             f"{tuple(out_channels)} need the same, non-zero length")
        self.stem = ConvNormAct(2, in_channels, stem_channels, kernel_size=7)
        stages = []
        channels = stem_channels
        for n_layers, c_out in zip(dense_layers, out_channels):
            block = DenseBlock(2, channels, n_layers, growth, bottleneck)
            stages.append(nn.Sequential(
                instance_norm(2, channels), nn.ReLU(inplace=True),
                Conv2d(channels, channels, 3, stride=2, padding=1, bias=False),
                block,
                instance_norm(2, block.out_channels), nn.ReLU(inplace=True),
                Conv2d(block.out_channels, c_out, 1, bias=False),
            ))
            channels = c_out
        self.stages = nn.ModuleList(stages)
        self.channels: tuple[int, ...] = (stem_channels, *out_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, S, S) -> ``[(B, channels[k], S / 2^k, S / 2^k) for k = 0..n]``."""
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats


__all__ = ["Feat2D", "Expand2Dto3D", "expand_along", "VIEW_AXES", "ProjectionAxis"]
