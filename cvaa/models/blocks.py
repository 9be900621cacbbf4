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


# cuDNN's tensor-core (implicit GEMM) kernels want channel counts in multiples of 8; a
# convolution with 1 or 2 input or output channels falls back to slow generic kernels
# (docs/performance.md, "Layers").
TENSOR_CORE_CHANNELS = 8


def tensor_core_multiple(device: torch.device) -> int:
    """The channel multiple convolutions are padded to on ``device``: 8 on CUDA (tensor
    cores), 1 (no padding) elsewhere, where padding would only add work."""
    return TENSOR_CORE_CHANNELS if device.type == "cuda" else 1


class _DeviceBranches:
    """Mixin: the layers whose formulation depends on the device. :func:`set_cuda_shaped`
    marks them: ``True`` takes the CUDA formulation on every device (a CPU rehearsal of a
    GPU run, ``train.cuda_shaped``), ``False`` the plain one everywhere (what the model
    computes, unpadded: FLOP counts); unmarked (``None``), the input's device decides."""

    cuda_shaped: bool | None = None

    def _multiple(self, x: torch.Tensor) -> int:
        if self.cuda_shaped is None:
            return tensor_core_multiple(x.device)
        return TENSOR_CORE_CHANNELS if self.cuda_shaped else 1


def set_cuda_shaped(module: nn.Module, flag: bool | None = True) -> nn.Module:
    """Make every device-dependent layer of ``module`` take its CUDA formulation on any
    device (``True``: channel padding to multiples of 8, the GEMM transposed conv, no CPU
    FFT conv), the plain layers on any device (``False``), or let the input's device decide
    again (``None``). Parameters, state_dict keys and results are unchanged. Returns
    ``module``.

    Example:
        >>> m = set_cuda_shaped(ConvTranspose3d(4, 2, 2, stride=2))
        >>> m.cuda_shaped
        True
    """
    for sub in module.modules():
        if isinstance(sub, _DeviceBranches):
            sub.cuda_shaped = flag
    return module


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_dim1(t: torch.Tensor, extra: int) -> torch.Tensor:
    """``t`` with ``extra`` zero slices appended along dim 1 (its layout is kept)."""
    if extra == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, extra))


def conv_padded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: Sequence[int] | int, padding: Sequence[int] | int,
                multiple: int, slice_output: bool = True) -> torch.Tensor:
    """``F.conv{2,3}d(x, weight, bias, stride, padding)`` with both channel counts padded.

    The input and the weight get zero channels up to a multiple of ``multiple`` of input
    channels (the zeros multiply zeros), and the weight (and bias) zero filters up to a
    multiple of output channels; those extra output channels are sliced off. So the result
    is the same function of ``x``, ``weight`` and ``bias`` (gradients included: the padding
    is outside the parameters), computed as a conv cuDNN can run on tensor cores. The
    padding is built at every call (a few KB of weight; the input's only when its channel
    count is odd-sized, e.g. the discriminator's 1-channel volume).

    Args:
        x: ``(B, C_in, *S)``; weight: ``(C_out, C_in, *k)``; bias: ``(C_out,)`` or None.
        stride, padding: as for ``F.conv3d`` (numeric padding only).
        multiple: channel multiple (:func:`tensor_core_multiple`); 1 is the plain conv.
        slice_output: drop the padded output channels (``False`` keeps them, zero, for a
            caller that sums several parts first and slices once).

    Example:
        >>> x, w = torch.rand(1, 1, 6, 6, 6), torch.rand(2, 1, 3, 3, 3)
        >>> torch.allclose(conv_padded(x, w, None, 1, 1, 8), F.conv3d(x, w, None, 1, 1), atol=1e-6)
        True
    """
    c_out, c_in = weight.shape[:2]
    extra_in = _round_up(c_in, multiple) - c_in
    extra_out = _round_up(c_out, multiple) - c_out
    fn = F.conv2d if weight.dim() == 4 else F.conv3d
    if extra_in:
        x = _pad_dim1(x, extra_in)
        weight = _pad_dim1(weight, extra_in)
    if extra_out:
        weight = F.pad(weight, (0, 0) * (weight.dim() - 2) + (0, 0, 0, extra_out))
        bias = None if bias is None else F.pad(bias, (0, extra_out))
    out = fn(x, weight, bias, stride, padding)
    return out[:, :c_out] if extra_out and slice_output else out


class _TensorCoreConv(_DeviceBranches):
    """Mixin for ``nn.Conv2d``/``nn.Conv3d``: on CUDA, channel counts are padded to
    multiples of 8 at call time (:func:`conv_padded`); parameters, state_dict keys and
    results are those of the plain conv."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        multiple = self._multiple(input)
        if multiple == 1 or self.padding_mode != "zeros" or self.groups != 1 \
                or isinstance(self.padding, str) or self.dilation != (1,) * len(self.dilation):
            return super()._conv_forward(input, weight, bias)  # type: ignore[misc]
        return conv_padded(input, weight, bias, self.stride, self.padding, multiple)


class Conv2d(_TensorCoreConv, nn.Conv2d):
    """``nn.Conv2d`` whose channel counts are padded to multiples of 8 on CUDA."""


class Conv3d(_TensorCoreConv, nn.Conv3d):
    """``nn.Conv3d`` whose channel counts are padded to multiples of 8 on CUDA.

    Example:
        >>> Conv3d(16, 1, 3, padding=1)(torch.zeros(1, 16, 4, 4, 4)).shape
        torch.Size([1, 1, 4, 4, 4])
    """


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """:class:`Conv2d` or :class:`Conv3d` (``nn.Conv2d``/``nn.Conv3d`` with tensor-core
    channel padding on CUDA)."""
    _check_dims(spatial_dims)
    return Conv2d if spatial_dims == 2 else Conv3d


def transposed_conv_no_overlap(x: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv_transpose{2,3}d(x, weight, bias, stride=k)`` for kernel ``k`` == stride.

    Such a transposed conv has no overlap: output voxel ``s * k + t`` is
    ``sum_c x[c, s] * weight[c, :, t]``, one tap per output voxel. That is one matrix
    product ``(B * prod(S), C_in) @ (C_in, C_out * prod(k))`` followed by a rearrangement
    of the ``k`` taps into space (a "pixel shuffle"): the same sums, computed by a GEMM
    on tensor cores instead of cuDNN's transposed conv (which for 16 -> 16 channels at
    64^3 -> 128^3 falls back to ``dgrad2d_grouped_direct_kernel``, 30 ms on an H200).
    The output keeps the input's layout (channels-last or contiguous).

    Args:
        x: ``(B, C_in, *S)``; weight: ``(C_in, C_out, *k)``; bias: ``(C_out,)`` or None.

    Returns:
        ``(B, C_out, *(S * k))``.

    Example:
        >>> x, w = torch.rand(1, 3, 2, 2, 2), torch.rand(3, 4, 2, 2, 2)
        >>> ref = F.conv_transpose3d(x, w, stride=2)
        >>> torch.allclose(transposed_conv_no_overlap(x, w, None), ref, atol=1e-6)
        True
    """
    n = x.dim() - 2
    batch, c_in, *spatial = x.shape
    c_out, kernel = weight.shape[1], tuple(weight.shape[2:])
    w = weight.reshape(c_in, -1)                                  # (C_in, C_out * prod(k))
    channels_last = x.dim() > 3 and x.movedim(1, -1).is_contiguous() and c_in > 1
    if channels_last:
        y = x.movedim(1, -1) @ w                                  # (B, *S, C_out * prod(k))
        y = y.view(batch, *spatial, c_out, *kernel)
        # (B, S0, k0, S1, k1, ..., C_out): channels-last memory of the output.
        order = [0] + [d for i in range(n) for d in (1 + i, 2 + n + i)] + [1 + n]
        out = y.permute(order).reshape(batch, *(s * k for s, k in zip(spatial, kernel)), c_out)
        out = out.movedim(-1, 1)
    else:
        y = w.t() @ x.reshape(batch, c_in, -1)                    # (B, C_out * prod(k), prod(S))
        y = y.view(batch, c_out, *kernel, *spatial)
        # (B, C_out, S0, k0, S1, k1, ...): contiguous memory of the output.
        order = [0, 1] + [d for i in range(n) for d in (2 + n + i, 2 + i)]
        out = y.permute(order).reshape(batch, c_out, *(s * k for s, k in zip(spatial, kernel)))
    if bias is not None:
        out = out + bias.view(1, -1, *(1,) * n)
    return out


class _NoOverlapTransposedConv(_DeviceBranches):
    """Mixin for ``nn.ConvTranspose2d``/``3d``: on CUDA, kernel == stride (no padding,
    dilation or groups) runs as :func:`transposed_conv_no_overlap`; same parameters and
    keys. On a CPU oneDNN's transposed conv is the faster one (8 -> 8 channels,
    4x8x16^3 -> 32^3, forward + backward, 1 thread: 83 ms against 180 ms), so it stays."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if (self._multiple(input) > 1
                and output_size is None and self.kernel_size == self.stride and self.groups == 1
                and not any(self.padding) and not any(self.output_padding)
                and all(d == 1 for d in self.dilation) and self.padding_mode == "zeros"):
            return transposed_conv_no_overlap(input, self.weight, self.bias)
        return super().forward(input, output_size)  # type: ignore[misc]


class ConvTranspose2d(_NoOverlapTransposedConv, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d``; kernel == stride runs as a matrix product."""


class ConvTranspose3d(_NoOverlapTransposedConv, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d``; kernel == stride runs as a matrix product.

    Example:
        >>> ConvTranspose3d(4, 2, 2, stride=2)(torch.zeros(1, 4, 3, 3, 3)).shape
        torch.Size([1, 2, 6, 6, 6])
    """


class _InstanceNormFunction(torch.autograd.Function):
    """Instance norm over dims 2.. with float32 statistics, in the input's layout.

    Saves the input and the per-(sample, channel) statistics, as PyTorch's instance norm
    does; the backward is the standard normalisation gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None,  # type: ignore[override]
                bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        dims = tuple(range(2, x.dim()))
        shape = (1, -1) + (1,) * len(dims)
        # At least float32 statistics (bf16 / fp16 inputs under autocast); a no-op for
        # float32 and float64.
        acc = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(acc)
        var, mean = torch.var_mean(xf, dim=dims, correction=0, keepdim=True)  # (B, C, 1, ...)
        rstd = torch.rsqrt(var + eps)
        scale = rstd if weight is None else rstd * weight.to(acc).view(shape)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(acc).view(shape)
        # Elementwise with (B, C, 1, ...) operands: the result takes x's strides.
        out = torch.addcmul(shift, xf, scale).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.dims = dims
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, mean, rstd = ctx.saved_tensors
        dims = ctx.dims
        shape = (1, -1) + (1,) * len(dims)
        acc = mean.dtype
        g = grad.to(acc)
        xhat = (x.to(acc) - mean) * rstd
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = (g * xhat).sum(dim=(0, *dims)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(dim=(0, *dims)).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gy = g if weight is None else g * weight.to(acc).view(shape)
            # d/dx of (x - mean) * rstd: rstd * (g - mean(g) - xhat * mean(g * xhat)).
            grad_x = rstd * (gy - gy.mean(dim=dims, keepdim=True)
                             - xhat * (gy * xhat).mean(dim=dims, keepdim=True))
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None


class InstanceNorm(nn.Module):
    """Instance norm that keeps the input's memory layout (channels-last or contiguous).

    Contiguous inputs go through ``F.instance_norm`` (PyTorch's); any other layout through
    a reduction over the spatial dims that keeps it. Both compute the function of
    ``nn.InstanceNorm{2,3}d(channels, affine, track_running_stats=False)``
    (per-sample, per-channel statistics over the spatial dims, biased variance, float32
    statistics under autocast, output in the input's dtype) and the same state_dict keys
    (``weight`` and ``bias`` when ``affine``, no running statistics). PyTorch's own runs
    through batch norm on a ``(1, B * C, N)`` reshape, which copies a channels-last input
    to the contiguous layout and back; this one reduces over the spatial dims in place.

    Args:
        spatial_dims: 2 or 3 (the input is ``(B, C, *S)`` with ``len(S) == spatial_dims``).
        channels: ``C``.
        affine: learnable per-channel scale (``weight``, ones) and shift (``bias``, zeros).
        eps: added to the variance (PyTorch's default 1e-5).

    Example:
        >>> x = torch.rand(2, 3, 4, 4, 4)
        >>> ref = nn.InstanceNorm3d(3, affine=True)(x)
        >>> torch.allclose(InstanceNorm(3, 3)(x), ref, atol=1e-5)
        True
    """

    def __init__(self, spatial_dims: int, channels: int, affine: bool = True,
                 eps: float = 1e-5) -> None:
        super().__init__()
        _check_dims(spatial_dims)
        _check_positive(channels=channels)
        self.spatial_dims, self.channels, self.eps = spatial_dims, channels, eps
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *S), in ``x``'s dtype and layout."""
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.channels:
            raise ValueError(f"InstanceNorm({self.spatial_dims}D, {self.channels} channels) "
                             f"got input of shape {tuple(x.shape)}")
        if x.is_contiguous():
            # Nothing to keep: PyTorch's kernel (on a CPU about twice as fast as the
            # reduction below: 4x8x32^3 forward + backward, 1 thread, 75 ms against 176).
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        return _InstanceNormFunction.apply(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.channels}, spatial_dims={self.spatial_dims}, eps={self.eps}, "
                f"affine={self.weight is not None}")


def instance_norm(spatial_dims: int, channels: int, affine: bool = True) -> nn.Module:
    """Instance norm (:class:`InstanceNorm`, layout-preserving), learnable scale and shift
    unless ``affine=False``."""
    return InstanceNorm(spatial_dims, channels, affine)


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
    channels_last = xs[0].is_contiguous(memory_format=torch.channels_last_3d)
    return out.contiguous(memory_format=torch.channels_last_3d if channels_last
                          else torch.contiguous_format)


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


class ConcatConv(_DeviceBranches, nn.Module):
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
        # On CUDA each part's channels are padded to tensor-core multiples (conv_padded);
        # the padded output channels are zero in every part and sliced off once.
        multiple = self._multiple(xs[0])
        out = None
        for x, w in zip(xs, conv.weight.split(self.splits, dim=1)):
            part = conv_padded(x, w, conv.bias if out is None else None, conv.stride,
                               conv.padding, multiple, slice_output=False)
            # In place: a conv's backward does not need its output.
            out = part if out is None else out.add_(part)
        c_out = conv.out_channels
        return out if out.shape[1] == c_out else out[:, :c_out]

    def _use_fft(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` convolves ``x`` (the first input) through :func:`fft_conv3d`:
        large odd 3D kernels, stride 1, same padding, on a CPU, and ``cpu_conv`` (with
        ``auto``: the memory now available) picks the FFT; never once
        :func:`set_cuda_shaped` has chosen a formulation."""
        conv = self.conv
        if self.cuda_shaped is not None:
            return False
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
        # kernel == stride: computed as a matrix product (``transposed_conv_no_overlap``).
        up = ConvTranspose2d if spatial_dims == 2 else ConvTranspose3d
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


__all__ = ["TENSOR_CORE_CHANNELS", "tensor_core_multiple", "set_cuda_shaped", "conv_padded", "Conv2d", "Conv3d",
           "transposed_conv_no_overlap", "ConvTranspose2d", "ConvTranspose3d", "InstanceNorm",
           "fast_fft_size", "fft_conv3d", "fft_conv_bytes", "available_memory_bytes",
           "choose_cpu_conv", "CpuConv", "CPU_CONV_MODES", "ConcatConv", "ConvNormAct", "UpConv",
           "DenseLayer", "DenseBlock", "UNet", "conv_type", "instance_norm", "activation",
           "count_parameters"]
