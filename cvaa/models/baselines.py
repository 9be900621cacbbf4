"""Baselines of the paper's Table I under the generator interface of ``CVAAGenerator``.

    G(xrays: (B, 2, S, S)) -> (B, 1, S, S, S) in (0, 1)

- ``X2CTGenerator``: X2CT-GAN (Ying et al. 2019): the same Feat2D encoders, a fully
  connected bottleneck per view at the deepest scale, mean fusion of the two views at every
  scale. Trained with the discriminator.
- ``UNet3DGenerator``: 3DCNN (Kasten et al. 2020): both X-rays back-projected (repeated)
  into a 2-channel volume, then a 3D U-Net. Trained without a discriminator.
- ``PSRGenerator``: PSR (Henzler et al. 2018): the PA view alone through a 2D U-Net whose
  output channels are the depth (H) axis. Trained without a discriminator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_fn

from .blocks import ConvNormAct, UNet, UpConv
from .encoder import VIEW_AXES, Expand2Dto3D, Feat2D, expand_along
from .generator import check_encoder_decoder, check_xrays, volume_size

if TYPE_CHECKING:
    from cvaa.config import Config


class FCBottleneck(nn.Module):
    """X2CT-GAN's link from 2D to 3D at the deepest scale: pool, fully connected, reshape.

    ``(B, C, s, s)`` -> global average pool -> Linear(C, C3 * s^3) -> Dropout -> ReLU ->
    ``(B, C3, s, s, s)``, laid out as (rows, projection, columns) of the view and then
    permuted into the shared (D, H, W) frame.

    Args:
        in_channels: channels of the deepest 2D feature map.
        out_channels: channels ``C3`` of the 3D feature volume.
        size: edge ``s`` of the deepest scale.
        axis: the view's projection axis, ``"H"`` (PA) or ``"W"`` (lateral).
        dropout: dropout probability (X2CT-GAN: 0.5).
    """

    def __init__(self, in_channels: int, out_channels: int, size: int, axis: str,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if axis not in ("H", "W"):
            raise ValueError(f"axis must be 'H' or 'W', got {axis!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.axis, self.size, self.out_channels = axis, size, out_channels
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(in_channels, out_channels * size ** 3),
                                nn.Dropout(dropout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, s, s) -> (B, C3, s, s, s) in (D, H, W) order."""
        s = self.size
        v = self.fc(x.mean(dim=(2, 3))).view(-1, self.out_channels, s, s, s)  # (rows, proj, cols)
        # PA: rows = D, proj = H, cols = W already; lateral: proj = W, cols = H -> swap.
        return v if self.axis == "H" else v.transpose(3, 4)


class MeanFusionLevel(nn.Module):
    """X2CT-GAN decoder level: ``UpConv(convs(cat(U, (F1 + F2) / 2)))``."""

    def __init__(self, channels: int, out_channels: int | None, checkpoint: bool = False) -> None:
        super().__init__()
        self.compress = ConvNormAct(3, (channels, channels), channels)   # over cat(U, mean)
        self.block = ConvNormAct(3, channels, channels)
        self.up = UpConv(3, channels, out_channels) if out_channels is not None else nn.Identity()
        self.checkpoint = checkpoint

    def _forward(self, u: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        return self.up(self.block(self.compress(u, (f1 + f2) / 2)))

    def forward(self, u: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) x 3 -> (B, out_channels, 2D, 2H, 2W) (or (B, C, D, H, W))."""
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint_fn(self._forward, u, f1, f2, use_reentrant=False)
        return self._forward(u, f1, f2)


class X2CTGenerator(nn.Module):
    """X2CT-GAN-style generator: mean fusion at every scale, FC bottleneck at the deepest.

    Same arguments as ``CVAAGenerator``; the views' fused feature replaces the CVAA module.
    (X2CT-GAN also keeps a decoder branch per view; this baseline keeps its fused branch.)
    """

    uses_discriminator = True

    def __init__(self, size: int = 128, stem_channels: int = 64, growth: int = 32,
                 dense_layers: Sequence[int] = (6, 12, 24, 16, 6),
                 encoder_channels: Sequence[int] = (128, 256, 512, 512, 512),
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16, 16),
                 checkpoint: bool = False, dropout: float = 0.5) -> None:
        super().__init__()
        check_encoder_decoder(size, dense_layers, encoder_channels, decoder_channels)
        self.size = size
        n = len(dense_layers)
        dec = tuple(decoder_channels)
        self.encoder_pa = Feat2D(1, stem_channels, growth, dense_layers, encoder_channels)
        self.encoder_lat = Feat2D(1, stem_channels, growth, dense_layers, encoder_channels)
        feat = self.encoder_pa.channels
        deepest = size // 2 ** n
        self.link_pa = FCBottleneck(feat[n], dec[0], deepest, VIEW_AXES[0], dropout)
        self.link_lat = FCBottleneck(feat[n], dec[0], deepest, VIEW_AXES[1], dropout)
        self.expand_pa = nn.ModuleList(
            Expand2Dto3D(feat[n - j], dec[j], VIEW_AXES[0]) for j in range(1, n + 1))
        self.expand_lat = nn.ModuleList(
            Expand2Dto3D(feat[n - j], dec[j], VIEW_AXES[1]) for j in range(1, n + 1))
        self.bottom = UpConv(3, dec[0], dec[1])
        self.fusions = nn.ModuleList(
            MeanFusionLevel(dec[j], dec[j + 1] if j < n else None, checkpoint=checkpoint)
            for j in range(1, n + 1))
        self.head = nn.Conv3d(dec[n], 1, kernel_size=3, padding=1)

    @property
    def output_conv(self) -> nn.Module:
        """The last convolution, before the sigmoid (see ``set_output_prior``)."""
        return self.head

    @classmethod
    def from_config(cls, cfg: "Config") -> "X2CTGenerator":
        m = cfg.model
        return cls(volume_size(cfg), m.stem_channels, m.growth, m.dense_layers,
                   m.encoder_channels, m.decoder_channels, m.checkpoint)

    def forward(self, xrays: torch.Tensor) -> torch.Tensor:
        """(B, 2, S, S) X-rays (PA, lateral) -> (B, 1, S, S, S) volume in (0, 1)."""
        check_xrays(xrays, self.size)
        feats_pa = self.encoder_pa(xrays[:, 0:1])
        feats_lat = self.encoder_lat(xrays[:, 1:2])
        n = len(feats_pa) - 1
        u = self.bottom((self.link_pa(feats_pa[n]) + self.link_lat(feats_lat[n])) / 2)
        for j, fusion in enumerate(self.fusions, start=1):
            u = fusion(u, self.expand_pa[j - 1](feats_pa[n - j]),
                       self.expand_lat[j - 1](feats_lat[n - j]))
        return torch.sigmoid(self.head(u))


def _check_unet_size(size: int, channels: Sequence[int], name: str) -> None:
    """A U-Net of ``len(channels)`` levels halves ``size`` that many times less one."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if size % 2 ** (len(channels) - 1):
        raise ValueError(f"size {size} must be divisible by 2^{len(channels) - 1} "
                         f"for {name}={tuple(channels)}")


class UNet3DGenerator(nn.Module):
    """3DCNN baseline (Kasten et al. 2020): back-projected X-rays -> 3D U-Net.

    Args:
        size: edge ``S`` of X-rays and volume.
        channels: U-Net widths per level, full resolution first.
    """

    uses_discriminator = False

    def __init__(self, size: int = 128, channels: Sequence[int] = (16, 32, 64, 128, 256)) -> None:
        super().__init__()
        _check_unet_size(size, channels, "unet_channels")
        self.size = size
        self.unet = UNet(3, 2, 1, channels)

    @property
    def output_conv(self) -> nn.Module:
        """The last convolution, before the sigmoid (see ``set_output_prior``)."""
        return self.unet.out

    @classmethod
    def from_config(cls, cfg: "Config") -> "UNet3DGenerator":
        return cls(volume_size(cfg), cfg.model.unet_channels)

    def forward(self, xrays: torch.Tensor) -> torch.Tensor:
        """(B, 2, S, S) X-rays (PA, lateral) -> (B, 1, S, S, S) volume in (0, 1)."""
        check_xrays(xrays, self.size)
        s = self.size
        vol = torch.cat([expand_along(xrays[:, 0:1], VIEW_AXES[0], s),   # PA repeated along H
                         expand_along(xrays[:, 1:2], VIEW_AXES[1], s)],  # lateral along W
                        dim=1)                                            # (B, 2, S, S, S)
        return torch.sigmoid(self.unet(vol))


class PSRGenerator(nn.Module):
    """PSR baseline (Henzler et al. 2018): PA view -> 2D U-Net with S output channels.

    The output channels are the volume's H axis (the PA projection axis), so the network
    predicts, for every PA pixel (D, W), the profile along the ray.

    Args:
        size: edge ``S`` of X-rays and volume.
        channels: 2D U-Net widths per level, full resolution first.
    """

    uses_discriminator = False

    def __init__(self, size: int = 128, channels: Sequence[int] = (64, 128, 256, 512, 512)) -> None:
        super().__init__()
        _check_unet_size(size, channels, "psr_channels")
        self.size = size
        self.unet = UNet(2, 1, size, channels)

    @property
    def output_conv(self) -> nn.Module:
        """The last convolution, before the sigmoid (see ``set_output_prior``)."""
        return self.unet.out

    @classmethod
    def from_config(cls, cfg: "Config") -> "PSRGenerator":
        return cls(volume_size(cfg), cfg.model.psr_channels)

    def forward(self, xrays: torch.Tensor) -> torch.Tensor:
        """(B, 2, S, S) X-rays; only channel 0 (PA) is used -> (B, 1, S, S, S) in (0, 1)."""
        check_xrays(xrays, self.size)
        depth = self.unet(xrays[:, 0:1])                       # (B, H, D, W)
        return torch.sigmoid(depth.permute(0, 2, 1, 3).unsqueeze(1)).contiguous()  # (B, 1, D, H, W)


__all__ = ["X2CTGenerator", "UNet3DGenerator", "PSRGenerator", "FCBottleneck",
           "MeanFusionLevel"]
