"""Conditional 3D PatchGAN discriminator D(X, Y) (paper II.B.1).

Each X-ray is expanded 2D -> 3D and convolved as in the generator's encoder, the two
feature volumes are concatenated with the CT volume on channels, and a 3D PatchGAN
(pix2pix layout: kernel-4 convs, IN, LeakyReLU 0.2, no norm on the first) maps them to a
grid of real/fake scores, one per receptive-field patch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .blocks import Conv3d, ConvNormAct
from .encoder import VIEW_AXES, Expand2Dto3D
from .generator import check_xrays, volume_size

if TYPE_CHECKING:
    from cvaa.config import Config


def _conv_out(size: int, stride: int) -> int:
    # kernel 4, padding 1
    return (size + 2 - 4) // stride + 1


class PatchDiscriminator3D(nn.Module):
    """Conditional 3D PatchGAN.

    Convs ``channels[:-1]`` have stride 2, ``channels[-1]`` stride 1, then a stride-1 conv
    to 1 channel (the patch map); all kernel 4, padding 1.

    Args:
        size: edge ``S`` of the volume and X-rays.
        channels: widths of the kernel-4 convs (X2CT-GAN: 64, 128, 256, 512).
        expand_channels: channels of each X-ray's 2D -> 3D expansion.

    Example:
        >>> d = PatchDiscriminator3D(32, (8, 16, 32), 4)
        >>> d(torch.rand(1, 2, 32, 32), torch.rand(1, 1, 32, 32, 32)).shape
        torch.Size([1, 1, 6, 6, 6])
    """

    def __init__(self, size: int = 128, channels: Sequence[int] = (64, 128, 256, 512),
                 expand_channels: int = 8) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels needs at least one entry")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size
        self.expand_pa = Expand2Dto3D(1, expand_channels, VIEW_AXES[0])
        self.expand_lat = Expand2Dto3D(1, expand_channels, VIEW_AXES[1])
        layers: list[nn.Module] = []
        c_in: int | tuple[int, ...] = (1, expand_channels, expand_channels)
        extent = size
        for i, c_out in enumerate(channels):
            stride = 2 if i < len(channels) - 1 else 1
            layers.append(ConvNormAct(3, c_in, c_out, kernel_size=4, stride=stride, padding=1,
                                      norm=i > 0, act="lrelu"))
            c_in, extent = c_out, _conv_out(extent, stride)
        layers.append(Conv3d(c_in, 1, kernel_size=4, stride=1, padding=1))
        extent = _conv_out(extent, 1)
        if extent < 1:
            raise ValueError(f"size {size} is too small for {len(channels)} PatchGAN convs "
                             f"(channels={tuple(channels)}): the patch map would be empty")
        self.patch_extent = extent
        self.net = nn.Sequential(*layers)

    @classmethod
    def from_config(cls, cfg: "Config") -> "PatchDiscriminator3D":
        return cls(volume_size(cfg), cfg.model.disc_channels, cfg.model.disc_expand_channels)

    def forward(self, xrays: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
        """(B, 2, S, S) X-rays and (B, 1, S, S, S) volume -> (B, 1, P, P, P) patch scores."""
        check_xrays(xrays, self.size)
        s = self.size
        if volume.shape != (xrays.shape[0], 1, s, s, s):
            raise ValueError(f"volume must be ({xrays.shape[0]}, 1, {s}, {s}, {s}), "
                             f"got {tuple(volume.shape)}")
        # The first conv sees cat(volume, PA, lateral) on channels (ConcatConv: unbuilt).
        x = self.net[0](volume,
                        self.expand_pa(xrays[:, 0:1]),     # (B, E, S, S, S), const along H
                        self.expand_lat(xrays[:, 1:2]))    # (B, E, S, S, S), const along W
        return self.net[1:](x)


__all__ = ["PatchDiscriminator3D"]
