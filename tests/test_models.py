"""Generators, discriminator and their parts (cvaa.models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvaa.config import load_config
from cvaa.losses import generator_loss, lsgan_d_loss
from cvaa.models import (GENERATORS, ConcatConv, CVAAGenerator, CVAAModule, Expand2Dto3D, Feat2D,
                         FineDistillation, PatchDiscriminator3D, ViewAttentionAlignment,
                         build_discriminator, build_generator, expand_along,
                         set_output_prior)
from cvaa.models.blocks import fast_fft_size, fft_conv3d

NAMES = sorted(GENERATORS)


def cpu_config(size: int = 32):
    return load_config("cpu", overrides=[f"preprocess.size={size}", f"drr.detector_pixels={size}"])


def xrays(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 2, size, size, generator=torch.Generator().manual_seed(seed))


# --- shapes ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size, batch", [(32, 2), (64, 1)])
def test_generator_shape_table(name, size, batch):
    torch.manual_seed(0)
    g = build_generator(name, cpu_config(size)).eval()
    with torch.no_grad():
        out = g(xrays(batch, size))
    assert out.shape == (batch, 1, size, size, size)
    assert out.dtype == torch.float32
    assert 0.0 < out.min() and out.max() < 1.0


@pytest.mark.parametrize("size, patch", [(32, 6), (64, 14)])
def test_discriminator_shape_table(size, patch):
    d = build_discriminator(cpu_config(size))
    assert d.patch_extent == patch
    out = d(xrays(2, size), torch.rand(2, 1, size, size, size))
    assert out.shape == (2, 1, patch, patch, patch)


def test_paper_discriminator_matches_x2ct_gan_size():
    d = build_discriminator(load_config("paper"))
    assert d.patch_extent == 14
    assert sum(p.numel() for p in d.parameters()) == pytest.approx(11.1e6, rel=0.01)


@pytest.mark.parametrize("kwargs, shape, expected", [
    (dict(in_channels=1, stem_channels=8, growth=4, dense_layers=(1, 2), out_channels=(16, 24)),
     (2, 1, 32, 32), [(2, 8, 32, 32), (2, 16, 16, 16), (2, 24, 8, 8)]),
    (dict(in_channels=1, stem_channels=4, growth=2, dense_layers=(1,), out_channels=(6,)),
     (1, 1, 8, 8), [(1, 4, 8, 8), (1, 6, 4, 4)]),
])
def test_feat2d_shape_table(kwargs, shape, expected):
    feats = Feat2D(**kwargs)(torch.rand(shape))
    assert [tuple(f.shape) for f in feats] == expected


@pytest.mark.slow
def test_cvaa_generator_paper_size_forward():
    torch.manual_seed(0)
    g = build_generator("cvaa", load_config("paper")).eval()
    with torch.no_grad():
        out = g(xrays(1, 128))
    assert out.shape == (1, 1, 128, 128, 128)
    assert torch.isfinite(out).all() and 0.0 < out.min() and out.max() < 1.0


@pytest.mark.parametrize("dims, stride", [(3, 1), (3, 2), (2, 1)])
def test_concat_conv_equals_conv_on_the_concatenation(dims, stride):
    torch.manual_seed(0)
    m = ConcatConv(dims, (2, 3, 1), 4, kernel_size=3, stride=stride)
    shape = (8,) * dims
    xs = [torch.randn(2, c, *shape, requires_grad=True) for c in (2, 3, 1)]
    out = m(*xs)
    grads = torch.autograd.grad(out.square().sum(), [*xs, m.conv.weight, m.conv.bias])
    cat = torch.cat(xs, dim=1)
    ref = m.conv(cat)                                         # the plain conv, same weight
    ref_grads = torch.autograd.grad(ref.square().sum(), [*xs, m.conv.weight, m.conv.bias])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):                        # summed in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="expected 3 inputs"):
        m(*xs[:2])


@pytest.mark.parametrize("splits, kernel, shape", [((3, 5), 7, (9, 10, 11)), ((4,), 5, (6, 6, 6))])
def test_large_kernel_concat_conv_on_cpu_goes_through_the_fft_and_equals_the_conv(
        splits, kernel, shape, monkeypatch):
    torch.manual_seed(0)
    m = ConcatConv(3, splits, 2, kernel_size=kernel).double()
    assert m._use_fft(torch.zeros(1, sum(splits), *shape))
    calls = []
    monkeypatch.setattr("cvaa.models.blocks.fft_conv3d",
                        lambda *a: calls.append(1) or fft_conv3d(*a))
    xs = [torch.randn(2, c, *shape, dtype=torch.float64, requires_grad=True) for c in splits]
    out = m(*xs)
    assert calls, "the FFT path was not taken"
    g = torch.randn_like(out)
    params = [*xs, m.conv.weight, m.conv.bias]
    grads = torch.autograd.grad((out * g).sum(), params)
    ref = m.conv(torch.cat(xs, dim=1))                         # MKL-DNN's direct conv
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_small_kernels_and_strides_keep_the_direct_conv():
    x = torch.zeros(1, 4, 8, 8, 8)
    assert not ConcatConv(3, (2, 2), 2, kernel_size=3)._use_fft(x)
    assert not ConcatConv(3, (2, 2), 2, kernel_size=7, stride=2)._use_fft(x)
    assert not ConcatConv(2, (2, 2), 2, kernel_size=7)._use_fft(x[:, :, 0])


def test_fast_fft_size_has_only_small_prime_factors():
    assert [fast_fft_size(n) for n in (1, 7, 38, 134, 22)] == [1, 8, 40, 135, 24]


@pytest.mark.parametrize("name", NAMES)
def test_output_prior_sets_the_starting_mean_of_every_generator(name):
    cfg = load_config("cpu")
    torch.manual_seed(0)
    g = build_generator(name, cfg).eval()
    xrays = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        assert abs(g(xrays).mean().item() - 0.5) < 0.15
        for mean in (0.1, 0.8):
            set_output_prior(g, mean)
            assert abs(g(xrays).mean().item() - mean) < 0.05
    with pytest.raises(ValueError, match="mean must be in"):
        set_output_prior(g, 1.0)


# --- data conventions: which axis each view projects along ---------------------------

def test_expand_along_puts_pa_columns_on_w_and_lateral_columns_on_h():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 2, 5] = 1.0                                   # row 2 (D), column 5
    pa = expand_along(image, "H", 8)                          # (1, 1, D, H, W)
    lat = expand_along(image, "W", 8)
    assert pa.shape == lat.shape == (1, 1, 8, 8, 8)
    assert (pa[0, 0, 2, :, 5] == 1).all() and pa.sum() == 8   # a ray along H at W = 5
    assert (lat[0, 0, 2, 5, :] == 1).all() and lat.sum() == 8  # a ray along W at H = 5


@pytest.mark.parametrize("axis, dim", [("H", 3), ("W", 4)])
def test_expansion_is_constant_along_the_projection_axis_only(axis, dim):
    torch.manual_seed(0)
    out = Expand2Dto3D(3, 4, axis)(torch.randn(2, 3, 8, 8))  # (B, C, D, H, W)
    assert out.shape == (2, 4, 8, 8, 8)
    assert torch.equal(out, out.narrow(dim, 0, 1).expand_as(out))
    other = 4 if dim == 3 else 3
    assert not torch.equal(out, out.narrow(other, 0, 1).expand_as(out))
    assert not torch.equal(out, out.narrow(2, 0, 1).expand_as(out))


@pytest.mark.parametrize("axis", ["H", "W"])
def test_expansion_equals_repeat_then_conv3d(axis):
    """The plane trick equals repeat -> 3^3 conv (replicate-padded along the axis) -> IN -> ReLU."""
    torch.manual_seed(0)
    m = Expand2Dto3D(3, 4, axis)
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 6, 6)
    dim = 3 if axis == "H" else 4
    k3 = torch.randn(4, 4, 3, 3, 3)                          # any 3^3 kernel
    with torch.no_grad():
        m.conv.weight.copy_(k3.sum(dim=dim))                  # ...reduces to its axis sum
        ref = expand_along(m.reduce(x), axis, 6).contiguous()  # repeat
        edge = [ref.narrow(dim, 0, 1), ref, ref.narrow(dim, 5, 1)]
        ref = torch.cat(edge, dim=dim)                        # replicate-pad the axis
        pad = (0, 1) if axis == "H" else (1, 0)               # zero-pad D and the other axis
        ref = F.conv3d(ref, k3, padding=(1, *pad))
        ref = F.relu(F.instance_norm(ref, weight=m.norm.weight, bias=m.norm.bias))
        out = m(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_generator_expansions_follow_the_view_axes():
    torch.manual_seed(0)
    g = build_generator("cvaa", cpu_config())
    seen = []

    def hook(dim):
        return lambda module, args, out: seen.append(
            torch.equal(out, out.narrow(dim, 0, 1).expand_as(out)))

    for m in g.expand_pa:
        m.register_forward_hook(hook(3))                      # PA: constant along H
    for m in g.expand_lat:
        m.register_forward_hook(hook(4))                      # lateral: constant along W
    with torch.no_grad():
        g(xrays(1, 32))
    assert len(seen) == 2 * len(g.expand_pa) and all(seen)


def test_psr_uses_only_the_pa_view_and_cvaa_uses_both():
    size = 32
    x = xrays(1, size)
    y = x.clone()
    y[:, 1] = torch.rand(size, size)                          # change the lateral view
    torch.manual_seed(0)
    psr = build_generator("psr", cpu_config()).eval()
    cvaa = build_generator("cvaa", cpu_config()).eval()
    with torch.no_grad():
        assert torch.equal(psr(x), psr(y))
        assert not torch.allclose(cvaa(x), cvaa(y))


# --- fusion --------------------------------------------------------------------------

def test_vaa_weights_sum_to_one_and_fd_weights_are_in_unit_interval():
    torch.manual_seed(0)
    u, f1, f2 = (torch.randn(2, 4, 6, 6, 6) * 3 for _ in range(3))
    vaa, fd = ViewAttentionAlignment(4), FineDistillation(4)
    w = vaa.weights(u, f1, f2)
    assert w.shape == (2, 2, 6, 6, 6)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2, 6, 6, 6))
    assert (w > 0).all() and w.std() > 0                      # not a constant split
    coarse = vaa(u, f1, f2)
    torch.testing.assert_close(coarse, w[:, :1] * f1 + w[:, 1:] * f2)
    g = fd.weights(coarse, u)
    assert g.shape == (2, 1, 6, 6, 6)
    assert (g > 0).all() and (g < 1).all()
    torch.testing.assert_close(fd(coarse, u), g * coarse)


def test_cvaa_module_checkpointing_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    plain = CVAAModule(4, 2)
    ckpt = CVAAModule(4, 2, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    inputs = [torch.randn(1, 4, 6, 6, 6) for _ in range(3)]
    outs = []
    for m in (plain, ckpt):
        out = m(*inputs)
        out.square().mean().backward()
        outs.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    assert outs[0][0].shape == (1, 2, 12, 12, 12)
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)


# --- gradients: no dead modules ------------------------------------------------------

def _dead(module: torch.nn.Module) -> list[str]:
    # A rounding-level gradient counts as dead too: e.g. a conv bias that a following
    # instance norm cancels gets ~1e-11 here, live parameters get > 1e-6.
    return [n for n, p in module.named_parameters()
            if p.grad is None or not p.grad.abs().max() > 1e-8]


@pytest.mark.parametrize("name", NAMES)
def test_one_gan_step_reaches_every_parameter(name):
    torch.manual_seed(0)
    cfg = cpu_config()
    g, d = build_generator(name, cfg), build_discriminator(cfg)
    x, y = xrays(2, 32), torch.rand(2, 1, 32, 32, 32)
    fake = g(x)
    # D step (paper eq. 1), on a detached fake.
    lsgan_d_loss(d(x, y), d(x, fake.detach())).backward()
    assert _dead(d) == []
    assert all(p.grad is None for p in g.parameters())
    # G step through D (only for adversarial generators), D frozen.
    d.requires_grad_(False)
    d_fake = d(x, fake) if g.uses_discriminator else None
    total, parts = generator_loss(fake, y, d_fake, cfg.loss)
    total.backward()
    assert _dead(g) == []
    assert set(parts) == ({"adv", "rec", "proj", "total"} if g.uses_discriminator
                          else {"rec", "proj", "total"})


def test_uses_discriminator_flags():
    flags = {name: cls.uses_discriminator for name, cls in GENERATORS.items()}
    assert flags == {"cvaa": True, "x2ct": True, "3dcnn": False, "psr": False}


# --- construction errors ---------------------------------------------------------------

def test_unknown_generator_lists_valid_names():
    with pytest.raises(KeyError, match="3dcnn.*cvaa.*psr.*x2ct"):
        build_generator("unet", cpu_config())


def test_mismatched_xray_and_volume_sizes_are_rejected():
    cfg = load_config("cpu").override(["drr.detector_pixels=64"])  # unvalidated
    with pytest.raises(ValueError, match="detector_pixels"):
        build_generator("cvaa", cfg)
    with pytest.raises(ValueError, match="detector_pixels"):
        build_discriminator(cfg)


@pytest.mark.parametrize("kwargs, match", [
    (dict(decoder_channels=(32, 16, 8)), "decoder_channels"),
    (dict(encoder_channels=(16, 24)), "encoder_channels"),
    (dict(size=36), "size 36"),
])
def test_generator_validates_its_arguments(kwargs, match):
    args = dict(size=32, stem_channels=8, growth=4, dense_layers=(1, 1, 1),
                encoder_channels=(16, 24, 32), decoder_channels=(32, 16, 8, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        CVAAGenerator(**args)


def test_discriminator_rejects_a_size_too_small_for_its_convs():
    with pytest.raises(ValueError, match="too small"):
        PatchDiscriminator3D(8, (8, 16, 32, 64), 2)


def test_generator_rejects_wrong_input_shape():
    g = build_generator("cvaa", cpu_config())
    with pytest.raises(ValueError, match=r"\(B, 2, 32, 32\)"):
        g(torch.rand(1, 1, 32, 32))
