"""The CVAA-GAN generator: two Feat2D encoders -> CVAA fusion decoder (paper II.A, Fig. 1).

    G(xrays: (B, 2, S, S)) -> (B, 1, S, S, S) in (0, 1)

Channel 0 of ``xrays`` is the PA view, channel 1 the lateral view (see ``encoder`` for
the axis conventions). With ``n`` encoder stages the decoder works at the ``n + 1``
scales ``S / 2^n, ..., S``: addition fusion at the deepest, a CVAA module at each of the
others (the full-resolution one fuses the stem features and has no up-convolution).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .blocks import Conv3d, ConvNormAct, CpuConv, UpConv
from .encoder import VIEW_AXES, Expand2Dto3D, Feat2D
from .fusion import CVAAModule

if TYPE_CHECKING:
    from cvaa.config import Config


def check_xrays(xrays: torch.Tensor, size: int) -> None:
    """Raise ``ValueError`` unless ``xrays`` is ``(B, 2, size, size)``."""
    if xrays.dim() != 4 or xrays.shape[1] != 2 or tuple(xrays.shape[2:]) != (size, size):
        raise ValueError(f"xrays must be (B, 2, {size}, {size}) (PA, lateral), "
                         f"got {tuple(xrays.shape)}")


def volume_size(cfg: "Config") -> int:
    """Edge of the volume and X-rays from a config; they must agree."""
    size = cfg.preprocess.size
    if cfg.drr.detector_pixels != size:
        raise ValueError(f"drr.detector_pixels ({cfg.drr.detector_pixels}) must equal "
                         f"preprocess.size ({size}): the 2D->3D expansion maps pixels to voxels")
    return size


def check_encoder_decoder(size: int, dense_layers: Sequence[int], encoder_channels: Sequence[int],
                          decoder_channels: Sequence[int]) -> None:
    """Validate the encoder/decoder lists against each other and the input size."""
    n = len(dense_layers)
    if n < 1:
        raise ValueError("dense_layers needs at least one stage")
    if len(encoder_channels) != n:
        raise ValueError(f"encoder_channels needs one entry per stage ({n}), "
                         f"got {tuple(encoder_channels)}")
    if len(decoder_channels) != n + 1:
        raise ValueError(f"decoder_channels needs stages + 1 = {n + 1} entries (deepest "
                         f"scale first, full resolution last), got {tuple(decoder_channels)}")
    if not isinstance(size, int) or size < 2 ** n or size % 2 ** n:
        raise ValueError(f"size {size} must be a positive multiple of 2^{n} for {n} stages")


class CVAAGenerator(nn.Module):
    """CVAA-GAN generator (paper II.A).

    Args:
        size: edge ``S`` of the X-rays and of the output volume.
        stem_channels, growth, dense_layers, encoder_channels: of each view's Feat2D.
        decoder_channels: channels at each decoder scale, deepest first (stages + 1).
        checkpoint: activation checkpointing in the CVAA modules.
        cpu_conv: CPU path of the VAA 7^3 convs: ``auto``, ``fft`` or ``direct``
            (``ModelConfig.cpu_conv``; ``ConcatConv``).

    Example:
        >>> g = CVAAGenerator(32, 8, 4, (1, 1, 1), (16, 24, 32), (32, 16, 8, 8))
        >>> g(torch.rand(1, 2, 32, 32)).shape
        torch.Size([1, 1, 32, 32, 32])
    """

    uses_discriminator = True

    def __init__(self, size: int = 128, stem_channels: int = 64, growth: int = 32,
                 dense_layers: Sequence[int] = (6, 12, 24, 16, 6),
                 encoder_channels: Sequence[int] = (128, 256, 512, 512, 512),
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16, 16),
                 checkpoint: bool = False, cpu_conv: CpuConv = "auto") -> None:
        super().__init__()
        check_encoder_decoder(size, dense_layers, encoder_channels, decoder_channels)
        self.size = size
        n = len(dense_layers)
        dec = tuple(decoder_channels)
        # One encoder per view, weights not shared (paper II.A).
        self.encoder_pa = Feat2D(1, stem_channels, growth, dense_layers, encoder_channels)
        self.encoder_lat = Feat2D(1, stem_channels, growth, dense_layers, encoder_channels)
        feat = self.encoder_pa.channels                       # stem, stage 1..n (full -> deepest)
        # 2D -> 3D at every scale; decoder level j uses encoder feature n - j.
        self.expand_pa = nn.ModuleList(
            Expand2Dto3D(feat[n - j], dec[j], VIEW_AXES[0]) for j in range(n + 1))
        self.expand_lat = nn.ModuleList(
            Expand2Dto3D(feat[n - j], dec[j], VIEW_AXES[1]) for j in range(n + 1))
        # Deepest scale: addition fusion, basic 3D conv block, up-convolution (II.A.2).
        self.bottom = nn.Sequential(ConvNormAct(3, dec[0], dec[0]), UpConv(3, dec[0], dec[1]))
        # Every later scale: a CVAA module; the full-resolution one has no up-convolution.
        self.fusions = nn.ModuleList(
            CVAAModule(dec[j], dec[j + 1] if j < n else None, checkpoint, cpu_conv)
            for j in range(1, n + 1))
        # 1 output channel: padded to 8 on CUDA (``Conv3d``).
        self.head = Conv3d(dec[n], 1, kernel_size=3, padding=1)

    @property
    def output_conv(self) -> nn.Module:
        """The last convolution, before the sigmoid (see ``set_output_prior``)."""
        return self.head

    @classmethod
    def from_config(cls, cfg: "Config") -> "CVAAGenerator":
        m = cfg.model
        return cls(volume_size(cfg), m.stem_channels, m.growth, m.dense_layers,
                   m.encoder_channels, m.decoder_channels, m.checkpoint, m.cpu_conv)

    def forward(self, xrays: torch.Tensor) -> torch.Tensor:
        """(B, 2, S, S) X-rays (PA, lateral) -> (B, 1, S, S, S) volume in (0, 1)."""
        check_xrays(xrays, self.size)
        feats_pa = self.encoder_pa(xrays[:, 0:1])             # [(B, c_k, S/2^k, S/2^k)]
        feats_lat = self.encoder_lat(xrays[:, 1:2])
        n = len(feats_pa) - 1
        u = self.bottom(self.expand_pa[0](feats_pa[n]) + self.expand_lat[0](feats_lat[n]))
        for j, fusion in enumerate(self.fusions, start=1):
            f1 = self.expand_pa[j](feats_pa[n - j])           # (B, C_j, s, s, s), const along H
            f2 = self.expand_lat[j](feats_lat[n - j])         # (B, C_j, s, s, s), const along W
            u = fusion(u, f1, f2)
        return torch.sigmoid(self.head(u))                    # (B, 1, S, S, S)


__all__ = ["CVAAGenerator", "check_xrays", "volume_size", "check_encoder_decoder"]
