"""Building blocks shared by the generators and the discriminator.

Blocks take ``spatial_dims`` (2 or 3) so the 2D X-ray encoders and the 3D decoders share
code. Normalisation is instance norm throughout G (paper section III.B) with learnable
affine parameters; a convolution followed by a norm has no bias (the norm would cancel it,
leaving a parameter that never receives a gradient).
"""

from __future__ import annotations

import math
import os
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["relu", "lrelu"] | None
CpuConv = Literal["auto", "fft", "direct"]
CPU_CONV_MODES: tuple[str, ...] = ("auto", "fft", "direct")
# Share of the available memory ``auto`` lets one FFT convolution take: the estimate is for
# one call, while a training step keeps every level's spectra for its backward pass (and
# the rest of the activations grow too), so half is left for everything else.
FFT_MEMORY_FRACTION = 0.5


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    _check_dims(spatial_dims)
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def instance_norm(spatial_dims: int, channels: int) -> nn.Module:
    """Instance norm with learnable scale and shift."""
    _check_dims(spatial_dims)
    norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
    return norm(channels, affine=True)


def activation(kind: Activation) -> nn.Module:
    """ReLU, LeakyReLU(0.2) (the PatchGAN's) or identity; in place to spare memory."""
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "lrelu":
        return nn.LeakyReLU(0.2, inplace=True)
    if kind is None:
        return nn.Identity()
    raise ValueError(f"act must be 'relu', 'lrelu' or None, got {kind!r}")


def fast_fft_size(n: int) -> int:
    """The smallest integer >= ``n`` whose only prime factors are 2, 3 and 5 (fast FFTs)."""
    m = max(1, n)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def fft_conv3d(xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
               bias: torch.Tensor | None, padding: Sequence[int]) -> torch.Tensor:
    """``sum_i F.conv3d(xs[i], weights[i], padding=padding) + bias`` through the FFT.

    Stride 1, odd kernels, "same" padding (``padding == kernel // 2``): the output has the
    inputs' extent. The same function as the direct convolution (to float rounding); on a
    CPU it is several times faster for large kernels (7^3 over 32^3: fwd + bwd 505 -> 91 ms,
    one thread), because MKL-DNN's backward pass for a 2-channel output is poorly vectorised.
    The inputs share one transform size, so the parts are summed in frequency space.
    """
    spatial = xs[0].shape[2:]
    kernel = weights[0].shape[2:]
    if any(k % 2 == 0 or p != k // 2 for k, p in zip(kernel, padding)):
        raise ValueError(f"fft_conv3d needs odd kernels with same padding, got kernel "
                         f"{tuple(kernel)} padding {tuple(padding)}")
    size = [fast_fft_size(s + k - 1) for s, k in zip(spatial, kernel)]
    dims = (2, 3, 4)
    total = None
    for x, w in zip(xs, weights):
        # Correlation = convolution with the flipped kernel; the full linear convolution
        # fits in `size`, so there is no wrap-around.
        xf = torch.fft.rfftn(x, s=size, dim=dims)
        wf = torch.fft.rfftn(torch.flip(w, dims), s=size, dim=dims)
        part = torch.einsum("bcdhw,ocdhw->bodhw", xf, wf)
        total = part if total is None else total + part
    full = torch.fft.irfftn(total, s=size, dim=dims)
    out = full[:, :, padding[0]:padding[0] + spatial[0], padding[1]:padding[1] + spatial[1],
               padding[2]:padding[2] + spatial[2]]
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1, 1)
    return out.contiguous()


def fft_conv_bytes(input_shape: Sequence[int], weight_shape: Sequence[int],
                   backward: bool = True) -> int:
    """Estimated extra working memory of :func:`fft_conv3d` over the direct conv, in bytes.

    Counts complex64 half spectra (``rfftn``: last axis ``n // 2 + 1``) on the padded
    transform grid. Forward: the input ``(B, C_in)`` and weight ``(C_out, C_in)`` spectra,
    kept for the backward, plus the contiguous copies the einsum's batched matmul makes of
    both, and the output's ``(B, C_out)``; backward: one gradient spectrum of each of the
    three while the forward's are still alive. The real padded volumes are an order smaller
    (one real value per grid point and channel) and not counted. Measured for
    ``ConcatConv(3, (16, 16), 2, kernel_size=7)`` forward + backward, 1 thread, peak RSS of
    fft minus direct: 0.41 GB at 64^3 (estimate 0.45), 1.42 GB at 96^3 (estimate 1.50).
    At 128^3 (135^3 grid) the estimate is 2.9 GB for one such conv; the whole paper-size
    generator measured +2.7 GB (FFT 5.4-5.7 GB, direct 2.7-2.9 GB).

    Args:
        input_shape: ``(B, C_in, D, H, W)`` (``C_in`` summed over the inputs).
        weight_shape: ``(C_out, C_in, kD, kH, kW)``.
        backward: count the gradients' spectra too (autograd will run a backward pass).

    Example:
        >>> round(fft_conv_bytes((1, 32, 128, 128, 128), (2, 32, 7, 7, 7)) / 1e9, 2)
        2.9
    """
    batch, c_in, *spatial = input_shape
    c_out, _, *kernel = weight_shape
    size = [fast_fft_size(s + k - 1) for s, k in zip(spatial, kernel)]
    bins = math.prod(size[:-1]) * (size[-1] // 2 + 1)       # rfftn's half spectrum
    operands, output = batch * c_in + c_out * c_in, batch * c_out
    spectra = 2 * operands + output                          # forward, with einsum copies
    if backward:
        spectra += operands + output                         # their gradients
    complex64 = 8
    return spectra * bins * complex64


def available_memory_bytes() -> int:
    """Memory the system can give without swapping: ``MemAvailable`` from /proc/meminfo
    (free pages plus reclaimable cache), else free physical pages (``SC_AVPHYS_PAGES``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024          # reported in kB
    except OSError:
        pass                                                   # not Linux: sysconf below
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_cpu_conv(mode: CpuConv, input_shape: Sequence[int], weight_shape: Sequence[int],
                    available_bytes: int, backward: bool = True) -> Literal["fft", "direct"]:
    """The CPU path of a convolution that :func:`fft_conv3d` can compute.

    ``fft`` and ``direct`` are returned as given; ``auto`` takes the FFT (faster: a
    paper-size CVAA forward + backward in 60 s instead of 120 s on 2 threads) unless its
    estimated memory (:func:`fft_conv_bytes`) exceeds ``FFT_MEMORY_FRACTION`` of
    ``available_bytes``; the direct convolution needs no such buffers.

    Args:
        mode: ``auto``, ``fft`` or ``direct`` (``ModelConfig.cpu_conv``).
        input_shape: ``(B, C_in, D, H, W)``; weight_shape: ``(C_out, C_in, kD, kH, kW)``.
        available_bytes: memory available now (:func:`available_memory_bytes`).
        backward: whether a backward pass will follow (its spectra are counted).

    Example:
        >>> choose_cpu_conv("auto", (1, 32, 128, 128, 128), (2, 32, 7, 7, 7), 16 * 2**30)
        'fft'
        >>> choose_cpu_conv("auto", (1, 32, 128, 128, 128), (2, 32, 7, 7, 7), 2 * 2**30)
        'direct'
    """
    if mode not in CPU_CONV_MODES:
        raise ValueError(f"cpu_conv must be one of {list(CPU_CONV_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    budget = FFT_MEMORY_FRACTION * available_bytes
    return "fft" if fft_conv_bytes(input_shape, weight_shape, backward) <= budget else "direct"


class ConcatConv(nn.Module):
    """A convolution over the channel concatenation of several inputs, without the concat.

    ``ConcatConv(dims, (c1, c2), out)(x1, x2) == ConvNd(c1 + c2, out)(cat([x1, x2], 1))``
    with the same single weight ``(out, c1 + c2, k, ...)``: each input is convolved with its
    slice of the weight and the parts are summed. The concatenated tensor (and its
    gradient) is never materialised, which at 128^3 spares hundreds of MB per fusion conv;
    the inputs themselves are kept for the backward pass anyway.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each input (an int for a single input).
        out_channels: output channels.
        kernel_size, stride, padding, bias: as for ``nn.Conv3d``; padding defaults to
            ``kernel_size // 2``.
        cpu_conv: on a CPU, how large 3D kernels are convolved: ``fft``, ``direct`` or
            ``auto`` (FFT unless it would not fit the memory budget; ``choose_cpu_conv``).

    Large 3D kernels (>= ``FFT_MIN_KERNEL``, stride 1, same padding) on a CPU can go through
    :func:`fft_conv3d`: the same function and weights, about twice as fast there but with
    extra memory for the spectra. On a GPU the direct convolution (cuDNN) is always used.

    Example:
        >>> a, b = torch.rand(1, 2, 6, 6, 6), torch.rand(1, 3, 6, 6, 6)
        >>> m = ConcatConv(3, (2, 3), 4)
        >>> torch.allclose(m(a, b), m.conv(torch.cat([a, b], 1)), atol=1e-6)
        True
    """

    FFT_MIN_KERNEL = 5

    def __init__(self, spatial_dims: int, in_channels: int | Sequence[int], out_channels: int,
                 kernel_size: int = 3, stride: int = 1, padding: int | None = None,
                 bias: bool = True, cpu_conv: CpuConv = "auto") -> None:
        super().__init__()
        splits = (in_channels,) if isinstance(in_channels, int) else tuple(in_channels)
        if not splits:
            raise ValueError("in_channels needs at least one entry")
        if cpu_conv not in CPU_CONV_MODES:
            raise ValueError(f"cpu_conv must be one of {list(CPU_CONV_MODES)}, got {cpu_conv!r}")
        self.cpu_conv = cpu_conv
        _check_positive(**{f"in_channels[{i}]": c for i, c in enumerate(splits)})
        _check_positive(out_channels=out_channels, kernel_size=kernel_size, stride=stride)
        self.splits = splits
        padding = kernel_size // 2 if padding is None else padding
        # Holds the one weight (and its default init); applied slice by slice below.
        self.conv = conv_type(spatial_dims)(sum(splits), out_channels, kernel_size,
                                            stride=stride, padding=padding, bias=bias)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """(B, c_i, *S) for each input i -> (B, out_channels, *S')."""
        if len(xs) != len(self.splits):
            raise ValueError(f"expected {len(self.splits)} inputs, got {len(xs)}")
        for x, c in zip(xs, self.splits):
            if x.shape[1] != c:
                raise ValueError(f"input with {x.shape[1]} channels where {c} were declared")
        conv = self.conv
        if self._use_fft(xs[0]):
            return fft_conv3d(xs, conv.weight.split(self.splits, dim=1), conv.bias,
                              conv.padding)
        if len(xs) == 1:
            return conv(xs[0])
        fn = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv3d
        out = None
        for x, w in zip(xs, conv.weight.split(self.splits, dim=1)):
            part = fn(x, w, conv.bias if out is None else None, conv.stride, conv.padding)
            # In place: a conv's backward does not need its output.
            out = part if out is None else out.add_(part)
        return out

    def _use_fft(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` convolves ``x`` (the first input) through :func:`fft_conv3d`:
        large odd 3D kernels, stride 1, same padding, on a CPU, and ``cpu_conv`` (with
        ``auto``: the memory now available) picks the FFT."""
        conv = self.conv
        if not (x.device.type == "cpu" and isinstance(conv, nn.Conv3d)
                and min(conv.kernel_size) >= self.FFT_MIN_KERNEL
                and all(k % 2 for k in conv.kernel_size) and conv.stride == (1, 1, 1)
                and conv.padding == tuple(k // 2 for k in conv.kernel_size)):
            return False
        if self.cpu_conv != "auto":
            return self.cpu_conv == "fft"
        input_shape = (x.shape[0], sum(self.splits), *x.shape[2:])
        # Under no_grad (inference) no gradient spectra are built.
        backward = torch.is_grad_enabled() and (conv.weight.requires_grad or x.requires_grad)
        return choose_cpu_conv("auto", input_shape, tuple(conv.weight.shape),
                               available_memory_bytes(), backward) == "fft"


class ConvNormAct(nn.Module):
    """Conv -> InstanceNorm -> activation (the paper's "basic 3D convolution block").

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels, or a sequence of them for several inputs that are
            convolved as if concatenated on channels (``ConcatConv``).
        out_channels: output channels.
        kernel_size, stride: of the convolution; padding defaults to ``kernel_size // 2``.
        norm: add instance norm (and drop the conv bias).
        act: ``relu``, ``lrelu`` or None.

    Example:
        >>> ConvNormAct(3, 4, 8)(torch.zeros(1, 4, 8, 8, 8)).shape
        torch.Size([1, 8, 8, 8, 8])
    """

    def __init__(self, spatial_dims: int, in_channels: int | Sequence[int], out_channels: int,
                 kernel_size: int = 3, stride: int = 1, padding: int | None = None,
                 norm: bool = True, act: Activation = "relu") -> None:
        super().__init__()
        if isinstance(in_channels, int):
            _check_positive(in_channels=in_channels, out_channels=out_channels,
                            kernel_size=kernel_size, stride=stride)
            pad = kernel_size // 2 if padding is None else padding
            self.conv: nn.Module = conv_type(spatial_dims)(
                in_channels, out_channels, kernel_size, stride=stride, padding=pad, bias=not norm)
        else:
            self.conv = ConcatConv(spatial_dims, in_channels, out_channels, kernel_size,
                                   stride, padding, bias=not norm)
        self.norm = instance_norm(spatial_dims, out_channels) if norm else nn.Identity()
        self.act = activation(act)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *S) (or one tensor per declared input) -> (B, C_out, *S')."""
        return self.act(self.norm(self.conv(*xs)))


class UpConv(nn.Sequential):
    """Up-convolution: transposed conv (kernel 2, stride 2) -> InstanceNorm -> ReLU.

    Doubles every spatial extent. A stride-2 kernel-2 transposed conv does not overlap
    (no checkerboard) and, unlike upsample + conv, keeps no full-resolution input for the
    backward pass.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        _check_positive(in_channels=in_channels, out_channels=out_channels)
        _check_dims(spatial_dims)
        up = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        super().__init__(up(in_channels, out_channels, 2, stride=2, bias=False),
                         instance_norm(spatial_dims, out_channels), nn.ReLU(inplace=True))


class DenseLayer(nn.Module):
    """DenseNet-BC layer: IN-ReLU-Conv1x1 (bottleneck) -> IN-ReLU-Conv3x3 (growth).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the concatenated input.
        growth: channels added by the layer.
        bottleneck: width of the 1x1 conv as a multiple of ``growth`` (DenseNet-BC: 4).
    """

    def __init__(self, spatial_dims: int, in_channels: int, growth: int,
                 bottleneck: int = 4) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, growth=growth, bottleneck=bottleneck)
        conv = conv_type(spatial_dims)
        width = bottleneck * growth
        self.layers = nn.Sequential(
            instance_norm(spatial_dims, in_channels), nn.ReLU(inplace=True),
            conv(in_channels, width, 1, bias=False),
            instance_norm(spatial_dims, width), nn.ReLU(inplace=True),
            conv(width, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C + growth, *S)."""
        return torch.cat([x, self.layers(x)], dim=1)


class DenseBlock(nn.Sequential):
    """``n_layers`` DenseLayers; output channels ``in_channels + n_layers * growth``."""

    def __init__(self, spatial_dims: int, in_channels: int, n_layers: int, growth: int,
                 bottleneck: int = 4) -> None:
        _check_positive(n_layers=n_layers)
        super().__init__(*(DenseLayer(spatial_dims, in_channels + i * growth, growth, bottleneck)
                           for i in range(n_layers)))
        self.out_channels = in_channels + n_layers * growth


class _Double(nn.Module):
    """Two ConvNormActs; the first may take several inputs (see ``ConcatConv``)."""

    def __init__(self, first: ConvNormAct, second: ConvNormAct) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(*xs))


class UNet(nn.Module):
    """Plain U-Net: double conv per level, max-pool down, up-conv + skip concat up.

    Used by the baselines: 3D for 3DCNN (Kasten et al. 2020), 2D for PSR (Henzler et al.
    2018). The output has no activation.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: channels in and out.
        channels: widths per level, full resolution first; the input's spatial extent
            must be divisible by ``2 ** (len(channels) - 1)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int]) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, out_channels=out_channels)
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {tuple(channels)}")
        for c in channels:
            _check_positive(channels=c)
        self.levels = len(channels)

        def double(cin: int | tuple[int, int], cout: int) -> nn.Module:
            return _Double(ConvNormAct(spatial_dims, cin, cout), ConvNormAct(spatial_dims, cout, cout))

        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        self.pool = pool(2)
        self.down = nn.ModuleList(
            [double(in_channels, channels[0])]
            + [double(channels[i - 1], channels[i]) for i in range(1, len(channels))])
        self.up = nn.ModuleList(
            [UpConv(spatial_dims, channels[i], channels[i - 1]) for i in range(len(channels) - 1, 0, -1)])
        self.merge = nn.ModuleList(
            [double((channels[i - 1], channels[i - 1]), channels[i - 1])
             for i in range(len(channels) - 1, 0, -1)])
        self.out = conv_type(spatial_dims)(channels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, *S) -> (B, out_channels, *S)."""
        factor = 2 ** (self.levels - 1)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"UNet input extent {tuple(x.shape[2:])} must be divisible by {factor}")
        skips = []
        for i, down in enumerate(self.down):
            x = down(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(up(x), skips.pop())                     # skip concat, unmaterialised
        return self.out(x)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["fast_fft_size", "fft_conv3d", "fft_conv_bytes", "available_memory_bytes",
           "choose_cpu_conv", "CpuConv", "CPU_CONV_MODES", "ConcatConv", "ConvNormAct", "UpConv",
           "DenseLayer", "DenseBlock", "UNet", "conv_type", "instance_norm", "activation",
           "count_parameters"]
