"""Baselines of the paper's Table I under the generator interface of ``CVAAGenerator``.

    G(xrays: (B, 2, S, S)) -> (B, 1, S, S, S) in (0, 1)

- ``X2CTGenerator``: X2CT-GAN (Ying et al. 2019), rebuilt after its released multi-view
  generator (kylekma/X2CT, ``d2_multiview2500``): one branch per view with its own DenseNet
  encoder, fully connected 2D -> 3D link, skip linkers and 3D decoder, the parameter-free
  mean of the two views at every decoder scale fed back into both branches, and a fused
  decoder that yields the volume. Trained with the discriminator. ``docs/x2ct_mapping.md``
  maps every part to the original code and lists the differences.
- ``UNet3DGenerator``: 3DCNN (Kasten et al. 2020): both X-rays back-projected (repeated)
  into a 2-channel volume, then a 3D U-Net. Trained without a discriminator.
- ``PSRGenerator``: PSR (Henzler et al. 2018): the PA view alone through a 2D U-Net whose
  output channels are the depth (H) axis. Trained without a discriminator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_fn

from .blocks import CPU_CONV_MODES, ConcatConv, Conv2d, Conv3d, CpuConv, InstanceNorm, UNet
from .encoder import VIEW_AXES, ProjectionAxis, expand_along
from .generator import check_xrays, volume_size

if TYPE_CHECKING:
    from cvaa.config import Config


# --- X2CT-GAN ---------------------------------------------------------------------------
#
# Frames. cvaa's volumes are (B, C, D, H, W); the PA image has rows along D and columns
# along W (it projects along H), the lateral image rows along D and columns along H (it
# projects along W). X2CT-GAN runs each branch in its own frame (copy axis, image rows,
# image columns) and permutes into the CT frame only to average the views. Here every 3D
# feature lives in the CT frame from the start: the 2D -> 3D links put their output there,
# so the fusion needs no permutation and both branches can take the fused mean as it is.
# The 3^3 convolutions and k3 s2 transposed convolutions pad all axes alike, so running a
# branch in the CT frame is the same function with its 3D kernels' axes permuted.

def _x2ct_norm(spatial_dims: int, channels: int) -> nn.Module:
    """X2CT-GAN's norm: instance norm without affine parameters, per-sample statistics.

    (The original keeps running statistics but never uses them: its test script puts every
    instance norm back in train mode; ``track_running_stats=False`` is that behaviour.)
    """
    return InstanceNorm(spatial_dims, channels, affine=False)


def _positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class X2CTDenseLayer(nn.Module):
    """X2CT-GAN's 2D dense layer: IN-ReLU-Conv1x1 (to ``4 * growth``) -> IN-ReLU-Conv3x3
    (to ``growth``), the new channels concatenated after the input; convs with bias."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int = 4) -> None:
        super().__init__()
        _positive(in_channels=in_channels, growth=growth, bottleneck=bottleneck)
        width = bottleneck * growth
        self.layers = nn.Sequential(
            _x2ct_norm(2, in_channels), nn.ReLU(inplace=True),
            Conv2d(in_channels, width, 1),
            _x2ct_norm(2, width), nn.ReLU(inplace=True),
            Conv2d(width, growth, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C + growth, h, w)."""
        return torch.cat([x, self.layers(x)], dim=1)


class X2CTEncoder(nn.Module):
    """One view's 2D encoder (X2CT-GAN ``UNetLike_DenseDimensionNet``, encoder part).

    Stem: ReflectionPad(3) -> Conv7x7 -> IN -> ReLU at full resolution. Then one stage per
    entry of ``dense_layers``: IN -> ReLU -> Conv3x3 stride 2, a dense block, and either a
    compression IN -> ReLU -> Conv1x1 to ``transitions[k]`` channels (X2CT-GAN: half; no
    pooling) or, after the last stage, a global average pool. Every conv has a bias; the norms have no affine
    parameters.

    Args:
        in_channels: X-ray channels (1).
        stem_channels: channels of the stem (X2CT-GAN: 64).
        growth: dense growth rate (X2CT-GAN: 32).
        dense_layers: dense layers per stage (X2CT-GAN: 6, 12, 24, 16, 6).
        bottleneck: width of the dense layers' 1x1 conv as a multiple of ``growth`` (4).
        transitions: output channels of the compression after each stage but the last;
            ``None`` halves them, as X2CT-GAN (128, 256, 512, 512 at its widths).

    ``channels`` lists the stem's and each stage's output channels (X2CT-GAN:
    64, 128, 256, 512, 512, 704); ``channels[k]`` for ``k < n`` is also the input of stage
    ``k``, which the skip linker ``k`` reads.

    Example:
        >>> enc = X2CTEncoder(1, 8, 4, (1, 2))
        >>> enc.channels
        (8, 6, 14)
        >>> [tuple(f.shape) for f in enc(torch.zeros(1, 1, 16, 16))]
        [(1, 8, 16, 16), (1, 6, 8, 8), (1, 14, 1, 1)]
    """

    def __init__(self, in_channels: int = 1, stem_channels: int = 64, growth: int = 32,
                 dense_layers: Sequence[int] = (6, 12, 24, 16, 6), bottleneck: int = 4,
                 transitions: Sequence[int] | None = None) -> None:
        super().__init__()
        _positive(in_channels=in_channels, stem_channels=stem_channels, growth=growth)
        if not dense_layers:
            raise ValueError("dense_layers needs at least one stage")
        if transitions is not None and len(transitions) != len(dense_layers) - 1:
            raise ValueError(f"transitions needs one entry per stage but the last "
                             f"({len(dense_layers) - 1}), got {list(transitions)}")
        for k, n_layers in enumerate(dense_layers):
            _positive(**{f"dense_layers[{k}]": n_layers})
        self.stem = nn.Sequential(nn.ReflectionPad2d(3), Conv2d(in_channels, stem_channels, 7),
                                  _x2ct_norm(2, stem_channels), nn.ReLU(inplace=True))
        stages, channels = [], [stem_channels]
        c = stem_channels
        for k, n_layers in enumerate(dense_layers):
            layers: list[nn.Module] = [_x2ct_norm(2, c), nn.ReLU(inplace=True),
                                       Conv2d(c, c, 3, stride=2, padding=1)]
            layers += [X2CTDenseLayer(c + i * growth, growth, bottleneck) for i in range(n_layers)]
            c += n_layers * growth
            if k == len(dense_layers) - 1:
                layers.append(nn.AdaptiveAvgPool2d(1))
            else:
                out = c // 2 if transitions is None else int(transitions[k])
                _positive(**{f"transitions[{k}]": out})
                layers += [_x2ct_norm(2, c), nn.ReLU(inplace=True), Conv2d(c, out, 1)]
                c = out
            stages.append(nn.Sequential(*layers))
            channels.append(c)
        self.stages = nn.ModuleList(stages)
        self.channels: tuple[int, ...] = tuple(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, S, S) -> ``[stem (B, c_0, S, S), stage k (B, c_k+1, S / 2^(k+1), ...)]``,
        the last one pooled to ``(B, c_n, 1, 1)``."""
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats


def _copy_taps(size: int) -> list[tuple[slice, int]]:
    """The kernel taps along the copy axis that see data, per class of output slice.

    A 3-tap zero-padded conv along an axis of ``size`` copies of one plane: the first slice
    sees taps 1-2, the last taps 0-1, the ``size - 2`` others all three. Returns
    ``[(taps, number of slices), ...]`` in slice order.
    """
    if size == 1:
        return [(slice(1, 2), 1)]
    inner = [(slice(0, 3), size - 2)] if size > 2 else []
    return [(slice(1, 3), 1), *inner, (slice(0, 2), 1)]


class SkipLinker(nn.Module):
    """X2CT-GAN's skip connection from 2D to 3D (``Dimension_UpsampleCutBlock``).

    ``ReLU(IN3d(Conv3d_3x3x3(copy(ReLU(IN2d(Conv2d_1x1(x)))))))``: the 2D map is copied
    along the view's projection axis (H for the PA view, W for the lateral view) and
    convolved with zero padding on every axis, as in the original. The module computes
    this without the copied volume: along the copy axis the input is constant, so each
    output slice is a 2D conv with the 3^3 kernel summed over the taps that see data
    (all three inside, two at either end; ``_copy_taps``), and the instance-norm
    statistics are those slices' weighted statistics. The result equals the 3D version (to
    rounding); it is constant along the projection axis except at its two end slices,
    which the zero padding makes differ, exactly as in X2CT-GAN.

    ``conv`` is a real ``nn.Conv3d`` whose kernel axes are (copy, image rows, image
    columns), X2CT-GAN's layout for this module.

    Args:
        in_channels: channels of the 2D feature map.
        out_channels: channels of the 3D feature volume.
        axis: the view's projection axis, ``"H"`` (PA) or ``"W"`` (lateral).

    Example:
        >>> SkipLinker(6, 4, "H")(torch.zeros(2, 6, 8, 8)).shape
        torch.Size([2, 4, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, axis: ProjectionAxis) -> None:
        super().__init__()
        if axis not in ("H", "W"):
            raise ValueError(f"axis must be 'H' (PA) or 'W' (lateral), got {axis!r}")
        _positive(in_channels=in_channels, out_channels=out_channels)
        self.axis: ProjectionAxis = axis
        self.reduce = nn.Sequential(Conv2d(in_channels, out_channels, 1),
                                    _x2ct_norm(2, out_channels), nn.ReLU(inplace=True))
        self.conv = Conv3d(out_channels, out_channels, 3, padding=1)
        self.eps = 1e-5                                     # nn.InstanceNorm3d's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, S, S) (rows along D) -> (B, C_out, S, S, S) in (D, H, W) order."""
        if x.dim() != 4 or x.shape[2] != x.shape[3]:
            raise ValueError(f"SkipLinker needs a square (B, C, S, S) map, got {tuple(x.shape)}")
        plane = self.reduce(x)                              # (B, C, rows, cols)
        size = plane.shape[2]                               # copies, as X2CT-GAN: the rows
        weight, bias = self.conv.weight, self.conv.bias      # (C, C, copy, rows, cols)
        taps = _copy_taps(size)
        slices = [F.conv2d(plane, weight[:, :, t].sum(dim=2), bias, padding=1) for t, _ in taps]
        # At least float32 statistics (under autocast too, as nn.InstanceNorm3d's).
        slices = [s.to(torch.promote_types(s.dtype, torch.float32)) for s in slices]
        # Instance norm over the whole (copy, rows, cols) volume, from the distinct slices.
        mean = sum(n * s.mean(dim=(2, 3), keepdim=True) for s, (_, n) in zip(slices, taps)) / size
        var = sum(n * (s - mean).square().mean(dim=(2, 3), keepdim=True)
                  for s, (_, n) in zip(slices, taps)) / size
        scale = torch.rsqrt(var + self.eps)
        dim = 3 if self.axis == "H" else 4                  # the copy axis in (B, C, D, H, W)
        parts = [expand_along(F.relu((s - mean) * scale), self.axis, n)
                 for s, (_, n) in zip(slices, taps)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class FCBottleneck(nn.Module):
    """X2CT-GAN's fully connected 2D -> 3D link at the deepest scale (``base_link``).

    ``(B, C, 1, 1)`` (the encoder's pooled output) -> Linear(C, C3 * s^3) -> Dropout ->
    ReLU, reshaped to ``(B, C3, s, s, s)`` in the view's frame (copy, rows, columns) as in
    X2CT-GAN and permuted into the shared (D, H, W) frame.

    Args:
        in_channels: channels of the pooled 2D feature.
        out_channels: channels ``C3`` of the 3D feature volume.
        size: edge ``s`` of the volume.
        axis: the view's projection axis, ``"H"`` (PA) or ``"W"`` (lateral).
        dropout: dropout probability (X2CT-GAN: 0.5).

    Example:
        >>> FCBottleneck(8, 4, 2, "W")(torch.zeros(3, 8, 1, 1)).shape
        torch.Size([3, 4, 2, 2, 2])
    """

    def __init__(self, in_channels: int, out_channels: int, size: int, axis: ProjectionAxis,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if axis not in ("H", "W"):
            raise ValueError(f"axis must be 'H' or 'W', got {axis!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        _positive(in_channels=in_channels, out_channels=out_channels, size=size)
        self.axis, self.size, self.out_channels = axis, size, out_channels
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(in_channels, out_channels * size ** 3),
                                nn.Dropout(dropout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, 1) -> (B, C3, s, s, s) in (D, H, W) order."""
        s = self.size
        v = self.fc(x).view(-1, self.out_channels, s, s, s)   # (copy, rows, cols)
        # PA: (H, D, W) -> (D, H, W); lateral: (W, D, H) -> (D, H, W).
        return v.permute(0, 1, 3, 2, 4) if self.axis == "H" else v.permute(0, 1, 3, 4, 2)


class X2CTConvBlock(nn.Module):
    """Conv3d 3^3 (bias) -> IN3d -> ReLU; several inputs are convolved as if concatenated
    on channels (``ConcatConv``: X2CT-GAN's ``cat`` + conv, without the concatenation)."""

    def __init__(self, in_channels: int | Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.conv: nn.Module = (Conv3d(in_channels, out_channels, 3, padding=1)
                                if isinstance(in_channels, int)
                                else ConcatConv(3, in_channels, out_channels, 3))
        self.norm = _x2ct_norm(3, out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *S) (or one tensor per declared input) -> (B, C_out, *S)."""
        return self.act(self.norm(self.conv(*xs)))


class X2CTUp(nn.Sequential):
    """X2CT-GAN's ``Upsample_TransposedConvBlock``: ConvTranspose3d (kernel 3, stride 2,
    padding 1, output padding 1, bias) -> IN3d -> ReLU; doubles every extent."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        _positive(in_channels=in_channels, out_channels=out_channels)
        super().__init__(nn.ConvTranspose3d(in_channels, out_channels, 3, stride=2, padding=1,
                                            output_padding=1),
                         _x2ct_norm(3, out_channels), nn.ReLU(inplace=True))


def _decoder_level(channels: int, out_channels: int | None, blocks: int) -> nn.Sequential:
    """``blocks`` X2CTConvBlocks at ``channels``, then X2CTUp to ``out_channels`` (if any)."""
    layers: list[nn.Module] = [X2CTConvBlock(channels, channels) for _ in range(blocks)]
    if out_channels is not None:
        layers.append(X2CTUp(channels, out_channels))
    return nn.Sequential(*layers)


def check_x2ct(size: int, dense_layers: Sequence[int], decoder_channels: Sequence[int],
               view_blocks: Sequence[int], fused_blocks: Sequence[int]) -> None:
    """Validate X2CTGenerator's lists against each other and the input size."""
    n = len(dense_layers)
    if n < 1:
        raise ValueError("dense_layers needs at least one stage")
    if len(decoder_channels) != n + 1:
        raise ValueError(f"decoder_channels needs stages + 1 = {n + 1} entries (deepest "
                         f"scale first, full resolution last), got {tuple(decoder_channels)}")
    for j, c in enumerate(decoder_channels):
        _positive(**{f"decoder_channels[{j}]": c})
    for name, blocks in (("view_blocks", view_blocks), ("fused_blocks", fused_blocks)):
        if len(blocks) != n + 1 or any(isinstance(b, bool) or not isinstance(b, int) or b < 0
                                       for b in blocks):
            raise ValueError(f"{name} needs stages + 1 = {n + 1} non-negative ints (X2CT-GAN's "
                             f"decoder_block_list: full resolution first), got {tuple(blocks)}")
        if blocks[-1] != 0:
            raise ValueError(f"{name}[-1] (the deepest scale, which has no conv blocks in "
                             f"X2CT-GAN) must be 0, got {tuple(blocks)}")
    if not isinstance(size, int) or size % 2 ** n or size // 2 ** n < 2:
        raise ValueError(f"size {size} must be a multiple of 2^{n} with a deepest scale "
                         f"size / 2^{n} >= 2 for {n} stages (instance norm needs more than "
                         f"one pixel)")


class X2CTViewBranch(nn.Module):
    """One view's branch of X2CT-GAN: encoder, FC link, skip linkers, per-view decoder.

    ``encode`` gives the encoder's features, the FC volume and the skip volumes (3D ones
    in the (D, H, W) frame). The decoder parts are driven level by level by ``X2CTGenerator`` because the two views are
    averaged after each level's compression: ``compress[j - 1]`` (levels ``j = 1..n``)
    takes ``cat(previous, skip)``; ``body[j]`` (levels ``j = 0..n-1``) takes the fused
    mean. The branch's tail after the last fusion (a conv block and a 7^3 head in
    X2CT-GAN, whose output only an auxiliary loss that the released setting switches off
    would read) is left out: it never receives a gradient.

    Args:
        axis: the view's projection axis, ``"H"`` (PA) or ``"W"`` (lateral).
        size, stem_channels, growth, dense_layers, decoder_channels: see ``X2CTGenerator``.
        blocks: conv blocks per level, X2CT-GAN's ``decoder_block_list`` (full resolution
            first); ``blocks[0]`` belongs to the left-out tail.
        dropout: of the FC link.
        transitions: the encoder's compression widths (``X2CTEncoder``).
    """

    def __init__(self, axis: ProjectionAxis, size: int, stem_channels: int, growth: int,
                 dense_layers: Sequence[int], decoder_channels: Sequence[int],
                 blocks: Sequence[int], dropout: float = 0.5,
                 transitions: Sequence[int] | None = None) -> None:
        super().__init__()
        n = len(dense_layers)
        dec = tuple(decoder_channels)
        self.axis: ProjectionAxis = axis
        self.encoder = X2CTEncoder(1, stem_channels, growth, dense_layers,
                                   transitions=transitions)
        ch = self.encoder.channels
        self.link = FCBottleneck(ch[n], dec[0], size // 2 ** n, axis, dropout)
        # Linker k reads the input of encoder stage k (scale S / 2^k) for decoder level n - k.
        self.linkers = nn.ModuleList(SkipLinker(ch[k], dec[n - k], axis) for k in range(n))
        self.compress = nn.ModuleList(X2CTConvBlock((dec[j], dec[j]), dec[j])
                                      for j in range(1, n + 1))
        self.body = nn.ModuleList(_decoder_level(dec[j], dec[j + 1], blocks[n - j])
                                  for j in range(n))

    def encode(self, xray: torch.Tensor
               ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """(B, 1, S, S) -> (the encoder's features, the FC volume ``(B, dec[0], s, s, s)``,
        the skip volumes for decoder levels 1..n), 3D ones in (D, H, W) order."""
        feats = self.encoder(xray)
        n = len(feats) - 1
        skips = [self.linkers[n - j](feats[n - j]) for j in range(1, n + 1)]
        return feats, self.link(feats[n]), skips


class X2CTGenerator(nn.Module):
    """X2CT-GAN's biplanar generator (Ying et al. 2019; kylekma/X2CT ``d2_multiview2500``).

    Per view (separate weights, ``branch_pa`` and ``branch_lat``): a DenseNet encoder
    (``X2CTEncoder``), the FC link of its pooled output to a ``dec[0]@s^3`` volume
    (``FCBottleneck``), a skip linker from the input of every encoder stage
    (``SkipLinker``) and a 3D decoder. At every decoder level ``j`` (deepest first) each
    branch compresses ``cat(its feature, its skip)`` (none at ``j = 0``), the two are
    averaged without weights, and the mean replaces both branch features (X2CT-GAN's
    ``backToSub``); each branch continues from it through its own conv blocks and
    transposed-conv upsampling, and the fused decoder compresses ``cat(mean, fused)`` and
    does the same. The fused decoder's last feature goes through a 7^3 conv and a sigmoid.

    Differences from the original (``docs/x2ct_mapping.md``): a sigmoid output (X2CT-GAN: a
    ReLU, clamped to [0, 1] at test time) so that the volume is in (0, 1) and the output
    prior applies; PyTorch's default init like every cvaa model (X2CT-GAN: N(0, 0.02)); the
    branches' never-trained tails are left out. Every conv keeps X2CT-GAN's bias, although
    an instance norm without affine parameters cancels it wherever one follows.

    Args:
        size: edge ``S`` of the X-rays and of the output volume.
        stem_channels, growth, dense_layers: of each view's encoder (X2CT-GAN: 64, 32,
            (6, 12, 24, 16, 6)); ``size / 2^len(dense_layers)`` is the FC volume's edge.
        decoder_channels: channels at each decoder scale, deepest first (stages + 1;
            X2CT-GAN: 256, 128, 64, 32, 16, 16).
        view_blocks, fused_blocks: conv blocks per decoder level of the view branches and
            of the fused decoder, X2CT-GAN's ``decoder_block_list`` order (full resolution
            first, the deepest scale last and 0); default ``(1, 2, ..., 2, 0)`` and
            ``(1, 1, ..., 1, 0)``, X2CT-GAN's.
        checkpoint: recompute each decoder level in the backward pass (activation
            checkpointing).
        dropout: of the FC links (X2CT-GAN: 0.5).
        cpu_conv: CPU path of the 7^3 output conv (``ConcatConv``).
        transitions: the encoders' compression widths after each stage but the last
            (``None``: half, X2CT-GAN's; the config passes ``model.encoder_channels``
            without its last entry, so that the encoders match CVAA-GAN's at every preset).

    Example:
        >>> g = X2CTGenerator(32, 8, 4, (1, 1, 1), (32, 16, 8, 8))
        >>> g(torch.rand(1, 2, 32, 32)).shape
        torch.Size([1, 1, 32, 32, 32])
    """

    uses_discriminator = True

    def __init__(self, size: int = 128, stem_channels: int = 64, growth: int = 32,
                 dense_layers: Sequence[int] = (6, 12, 24, 16, 6),
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16, 16),
                 view_blocks: Sequence[int] | None = None,
                 fused_blocks: Sequence[int] | None = None,
                 checkpoint: bool = False, dropout: float = 0.5,
                 cpu_conv: CpuConv = "auto", transitions: Sequence[int] | None = None) -> None:
        super().__init__()
        n = len(dense_layers)
        view_blocks = tuple(view_blocks) if view_blocks is not None else (1,) + (2,) * (n - 1) + (0,)
        fused_blocks = tuple(fused_blocks) if fused_blocks is not None else (1,) * n + (0,)
        check_x2ct(size, dense_layers, decoder_channels, view_blocks, fused_blocks)
        if cpu_conv not in CPU_CONV_MODES:
            raise ValueError(f"cpu_conv must be one of {list(CPU_CONV_MODES)}, got {cpu_conv!r}")
        self.size = size
        self.view_blocks, self.fused_blocks = view_blocks, fused_blocks
        dec = tuple(decoder_channels)
        self.branch_pa = X2CTViewBranch(VIEW_AXES[0], size, stem_channels, growth, dense_layers,
                                        dec, view_blocks, dropout, transitions)
        self.branch_lat = X2CTViewBranch(VIEW_AXES[1], size, stem_channels, growth,
                                         dense_layers, dec, view_blocks, dropout, transitions)
        # Fused decoder: level j compresses cat(mean, fused) (none at j = 0), then its
        # conv blocks and (below full resolution) the up-convolution.
        self.fused_compress = nn.ModuleList(X2CTConvBlock((dec[j], dec[j]), dec[j])
                                            for j in range(1, n + 1))
        self.fused_body = nn.ModuleList(
            _decoder_level(dec[j], dec[j + 1] if j < n else None, fused_blocks[n - j])
            for j in range(n + 1))
        self.head = ConcatConv(3, dec[n], 1, kernel_size=7, padding=3, cpu_conv=cpu_conv)
        self.checkpoint = checkpoint

    @property
    def output_conv(self) -> nn.Module:
        """The last convolution, before the sigmoid (see ``set_output_prior``)."""
        return self.head.conv

    @classmethod
    def from_config(cls, cfg: "Config") -> "X2CTGenerator":
        m = cfg.model
        return cls(volume_size(cfg), m.stem_channels, m.growth, m.dense_layers,
                   m.decoder_channels, checkpoint=m.checkpoint, cpu_conv=m.cpu_conv,
                   transitions=m.encoder_channels[:-1])

    def _level(self, j: int, v_pa: torch.Tensor, v_lat: torch.Tensor, fused: torch.Tensor | None,
               skip_pa: torch.Tensor | None, skip_lat: torch.Tensor | None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Decoder level ``j``: compress each view, average, continue all three streams.

        Returns the branches' next features (None after the last level), the fused
        decoder's and the views' mean.
        """
        if j > 0:
            v_pa = self.branch_pa.compress[j - 1](v_pa, skip_pa)
            v_lat = self.branch_lat.compress[j - 1](v_lat, skip_lat)
        mean = (v_pa + v_lat) / 2                            # both already in (D, H, W)
        fused = self.fused_body[j](mean if j == 0 else self.fused_compress[j - 1](mean, fused))
        if j == len(self.fused_compress):                    # full resolution: branches end
            return None, None, fused, mean
        return self.branch_pa.body[j](mean), self.branch_lat.body[j](mean), fused, mean

    def _run(self, xrays: torch.Tensor, record: dict[str, torch.Tensor] | None) -> torch.Tensor:
        check_xrays(xrays, self.size)
        feats_pa, v_pa, skips_pa = self.branch_pa.encode(xrays[:, 0:1])
        feats_lat, v_lat, skips_lat = self.branch_lat.encode(xrays[:, 1:2])
        n = len(skips_pa)
        if record is not None:
            for name, feats, fc, skips in (("pa", feats_pa, v_pa, skips_pa),
                                           ("lat", feats_lat, v_lat, skips_lat)):
                record.update({f"encoder_{name}.{k}": f for k, f in enumerate(feats)})
                record[f"fc_{name}"] = fc
                record.update({f"skip_{name}.{j}": s for j, s in enumerate(skips, start=1)})
        fused: torch.Tensor | None = None
        for j in range(n + 1):
            args = (j, v_pa, v_lat, fused, skips_pa[j - 1] if j else None,
                    skips_lat[j - 1] if j else None)
            if self.checkpoint and torch.is_grad_enabled():
                v_pa, v_lat, fused, mean = checkpoint_fn(self._level, *args, use_reentrant=False)
            else:
                v_pa, v_lat, fused, mean = self._level(*args)
            if record is not None:
                record[f"mean.{j}"], record[f"fused.{j}"] = mean, fused
                if j < n:
                    record[f"view_pa.{j}"], record[f"view_lat.{j}"] = v_pa, v_lat
        out = torch.sigmoid(self.head(fused))               # (B, 1, S, S, S)
        if record is not None:
            record["out"] = out
        return out

    def features(self, xrays: torch.Tensor) -> dict[str, torch.Tensor]:
        """The intermediate features of a forward pass, by name (for inspection and tests).

        With ``n`` stages: ``encoder_{pa,lat}.{k}`` (k = 0 the stem, 1..n the stages, the
        last pooled to 1x1), ``fc_{pa,lat}``, ``skip_{pa,lat}.{j}`` (the linker outputs for
        decoder levels j = 1..n), ``mean.{j}`` (j = 0..n, the views' mean after level j's
        compression), ``view_{pa,lat}.{j}`` (j = 0..n-1, each branch's output of level j),
        ``fused.{j}`` (j = 0..n) and ``out``. 3D features are (B, C, D, H, W).
        """
        record: dict[str, torch.Tensor] = {}
        self._run(xrays, record)
        return record

    def forward(self, xrays: torch.Tensor) -> torch.Tensor:
        """(B, 2, S, S) X-rays (PA, lateral) -> (B, 1, S, S, S) volume in (0, 1)."""
        return self._run(xrays, None)


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


__all__ = ["X2CTGenerator", "UNet3DGenerator", "PSRGenerator", "X2CTEncoder", "X2CTDenseLayer",
           "X2CTViewBranch", "X2CTConvBlock", "X2CTUp", "SkipLinker", "FCBottleneck",
           "check_x2ct"]
