"""The tensor-core reformulations in cvaa.models.blocks compute the old layers' function.

Old formulation (plain ``F.conv*``, ``nn.ConvTranspose*``, ``nn.InstanceNorm*``) against
the new one with the same weights, float32 on the CPU: outputs and every gradient.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvaa.models import blocks
from cvaa.models.blocks import (ConcatConv, Conv3d, ConvNormAct, ConvTranspose2d,
                                ConvTranspose3d, InstanceNorm, UpConv, conv_padded,
                                transposed_conv_no_overlap)

CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def _grads(out: torch.Tensor, tensors, seed: int = 0) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * g).sum(), tensors)


def _close(a, b, tol=1e-5):
    """Equal up to float32 rounding of sums as large as the tensor's largest value: a 7^3
    conv over 16 channels sums 5,488 products, so an output near 0 among outputs near 70
    differs by ~1e-5 between two summation orders (oneDNN picks its algorithm by thread
    count and load), while a wrong formulation differs by O(1)."""
    for x, y in zip(a, b):
        assert x.shape == y.shape
        scale = max(1.0, float(y.abs().max()))
        torch.testing.assert_close(x, y, atol=tol * scale, rtol=tol)


# [C_in, C_out, kernel, stride, padding, spatial dims, bias]: the layers behind the H200
# fallback kernels and the tiny heads (docs/performance.md, "Layers").
CONV_CASES = [
    (1, 16, 4, 2, 1, 3, True),     # D's first conv, 1-channel volume part
    (16, 2, 7, 1, 3, 3, True),     # VAA mix (2 outputs, 7^3)
    (16, 1, 3, 1, 1, 3, True),     # FD gate / CVAA head (1 output)
    (12, 1, 1, 1, 0, 3, True),     # 3DCNN's 1x1 output conv
    (1, 8, 7, 1, 3, 2, False),     # 2D stem on a 1-channel X-ray
    (9, 3, 3, 2, 1, 2, True),      # neither a multiple of 8, stride 2
    (8, 16, 3, 1, 1, 3, False),    # already multiples of 8: unchanged
]


@pytest.mark.parametrize("c_in,c_out,k,stride,pad,dims,bias", CONV_CASES)
def test_padded_conv_equals_the_conv_forward_and_gradients(c_in, c_out, k, stride, pad, dims,
                                                           bias):
    torch.manual_seed(0)
    x = torch.randn(2, c_in, *(9,) * dims, requires_grad=True)
    w = torch.randn(c_out, c_in, *(k,) * dims, requires_grad=True)
    b = torch.randn(c_out, requires_grad=True) if bias else None
    fn = F.conv2d if dims == 2 else F.conv3d
    ref = fn(x, w, b, stride, pad)
    new = conv_padded(x, w, b, stride, pad, multiple=8)
    assert new.shape == ref.shape
    leaves = [x, w] + ([b] if bias else [])
    _close([new], [ref])
    _close(_grads(new, leaves), _grads(ref, leaves))


def test_padded_conv_keeps_a_channels_last_layout_and_pads_nothing_at_multiple_1():
    x = torch.randn(1, 1, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(8, 1, 3, 3, 3)
    # The 1-channel input padded to 8 stays channels-last (F.pad keeps the layout).
    padded = blocks._pad_dim1(torch.randn(1, 3, 4, 4, 4).contiguous(memory_format=CL[5]), 5)
    assert padded.shape[1] == 8 and padded.is_contiguous(memory_format=CL[5])
    assert torch.equal(conv_padded(x, w, None, 1, 1, multiple=1), F.conv3d(x, w, None, 1, 1))


@pytest.fixture
def tensor_cores(monkeypatch):
    """Run the CUDA formulation on the CPU: channel multiple 8 on every device."""
    monkeypatch.setattr(blocks, "tensor_core_multiple", lambda device: 8)


@pytest.mark.parametrize("splits,c_out,k,stride", [
    ((1, 4, 4), 8, 4, 2),          # the discriminator's first conv: cat(volume, PA, lateral)
    ((6, 6), 2, 7, 1),             # VAA mix
    ((6, 6), 1, 3, 1),             # FD gate
])
def test_concat_conv_on_the_tensor_core_path_equals_one_conv_on_the_concatenation(
        tensor_cores, splits, c_out, k, stride):
    torch.manual_seed(0)
    m = ConcatConv(3, splits, c_out, kernel_size=k, stride=stride, padding=k // 2 if k % 2 else 1,
                   cpu_conv="direct")
    xs = [torch.randn(2, c, 8, 8, 8, requires_grad=True) for c in splits]
    cat = torch.cat(xs, dim=1)
    ref = F.conv3d(cat, m.conv.weight, m.conv.bias, m.conv.stride, m.conv.padding)
    new = m(*xs)
    leaves = [*xs, m.conv.weight, m.conv.bias]
    _close([new], [ref])
    _close(_grads(new, leaves), _grads(ref, leaves))


def test_conv3d_module_on_the_tensor_core_path_equals_nn_conv3d(tensor_cores):
    torch.manual_seed(0)
    old = nn.Conv3d(16, 1, 3, padding=1)
    new = Conv3d(16, 1, 3, padding=1)
    new.load_state_dict(old.state_dict())
    x = torch.randn(2, 16, 6, 6, 6)
    _close([new(x)], [old(x)])
    _close(_grads(new(x), list(new.parameters())), _grads(old(x), list(old.parameters())))


@pytest.mark.parametrize("dims,channels_last,bias", [(3, False, False), (3, True, False),
                                                     (2, False, True), (2, True, True)])
def test_transposed_conv_as_a_matrix_product_equals_the_transposed_conv(dims, channels_last,
                                                                        bias):
    torch.manual_seed(0)
    x = torch.randn(2, 6, *(3,) * dims)
    if channels_last:
        x = x.contiguous(memory_format=CL[dims + 2])
    x.requires_grad_(True)
    w = torch.randn(6, 4, *(2,) * dims, requires_grad=True)
    b = torch.randn(4, requires_grad=True) if bias else None
    fn = F.conv_transpose2d if dims == 2 else F.conv_transpose3d
    ref = fn(x, w, b, stride=2)
    new = transposed_conv_no_overlap(x, w, b)
    leaves = [x, w] + ([b] if bias else [])
    _close([new], [ref])
    _close(_grads(new, leaves), _grads(ref, leaves))
    # The output keeps the input's layout.
    assert new.is_contiguous(memory_format=CL[dims + 2] if channels_last
                             else torch.contiguous_format)


def test_transposed_conv_modules_keep_overlapping_kernels_on_the_plain_path(tensor_cores):
    torch.manual_seed(0)
    old = nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1, output_padding=1)
    new = ConvTranspose3d(4, 2, 3, stride=2, padding=1, output_padding=1)
    new.load_state_dict(old.state_dict())
    x = torch.randn(1, 4, 3, 3, 3)
    _close([new(x)], [old(x)])
    old2, new2 = nn.ConvTranspose2d(4, 3, 2, stride=2), ConvTranspose2d(4, 3, 2, stride=2)
    new2.load_state_dict(old2.state_dict())
    x2 = torch.randn(1, 4, 5, 5)
    _close([new2(x2)], [old2(x2)])


@pytest.mark.parametrize("dims,affine", [(3, True), (2, True), (3, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_instance_norm_equals_pytorchs_forward_and_gradients(dims, affine, channels_last):
    torch.manual_seed(0)
    old = (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(5, affine=affine)
    if affine:
        with torch.no_grad():
            old.weight.uniform_(0.5, 1.5)
            old.bias.uniform_(-1, 1)
    new = InstanceNorm(dims, 5, affine=affine)
    new.load_state_dict(old.state_dict())          # same keys (none without affine)
    assert sorted(new.state_dict()) == sorted(old.state_dict())
    x = (torch.randn(3, 5, *(6,) * dims) * 3 + 2).requires_grad_(True)
    leaves = [x, *old.parameters()]
    ref = old(x)
    # Channels-last: the layout-keeping reduction; contiguous: PyTorch's kernel.
    out = new(x.contiguous(memory_format=CL[dims + 2]) if channels_last else x)
    _close([out], [ref])
    _close(_grads(out, [x, *new.parameters()]), _grads(ref, leaves), tol=2e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_keeps_a_channels_last_layout(dims):
    torch.manual_seed(0)
    x = torch.randn(2, 5, *(6,) * dims).contiguous(memory_format=CL[dims + 2])
    x.requires_grad_(True)
    new = InstanceNorm(dims, 5)
    out = new(x)
    assert out.is_contiguous(memory_format=CL[dims + 2])
    assert not out.is_contiguous()
    # With a channels-last gradient from downstream, the input's gradient is channels-last.
    upstream = torch.randn(out.shape).contiguous(memory_format=CL[dims + 2])
    (g,) = torch.autograd.grad(out, [x], upstream)
    assert g.is_contiguous(memory_format=CL[dims + 2])
    # PyTorch's own hands back a contiguous tensor, which is why it was replaced.
    assert (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(5)(x).is_contiguous()


def test_instance_norm_under_bf16_autocast_keeps_float32_statistics():
    torch.manual_seed(0)
    x = (torch.randn(2, 4, 6, 6, 6) * 0.1 + 30).bfloat16()  # mean >> std: needs fp32 stats
    ref = nn.InstanceNorm3d(4)(x.float())
    out = InstanceNorm(3, 4, affine=False)(x.contiguous(memory_format=CL[5]))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)


def test_old_format_block_state_dicts_load_into_the_new_blocks(tensor_cores):
    torch.manual_seed(0)
    # UpConv and ConvNormAct as they were built with nn.ConvTranspose3d / nn.Conv3d /
    # nn.InstanceNorm3d: the same keys and shapes, and the same function.
    old_up = nn.Sequential(nn.ConvTranspose3d(6, 4, 2, stride=2, bias=False),
                           nn.InstanceNorm3d(4, affine=True), nn.ReLU())
    new_up = UpConv(3, 6, 4)
    new_up.load_state_dict(old_up.state_dict(), strict=True)
    x = torch.randn(2, 6, 3, 3, 3)
    _close([new_up(x)], [old_up(x)])
    old_cna = nn.ModuleDict({"conv": nn.Conv3d(3, 8, 3, padding=1, bias=False),
                             "norm": nn.InstanceNorm3d(8, affine=True)})
    new_cna = ConvNormAct(3, 3, 8)
    new_cna.load_state_dict(old_cna.state_dict(), strict=True)
    y = torch.randn(1, 3, 5, 5, 5)
    _close([new_cna(y)], [torch.relu(old_cna["norm"](old_cna["conv"](y)))])


def test_invalid_instance_norm_input_names_the_shape():
    with pytest.raises(ValueError, match=r"InstanceNorm\(3D, 4 channels\).*\(1, 3, 2, 2, 2\)"):
        InstanceNorm(3, 4)(torch.zeros(1, 3, 2, 2, 2))
