"""Generators, discriminator and their parts (cvaa.models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvaa.config import ConfigError, load_config
from cvaa.losses import generator_loss, lsgan_d_loss
from cvaa.models import (GENERATORS, ConcatConv, CVAAGenerator, CVAAModule, Expand2Dto3D, Feat2D,
                         FineDistillation, PatchDiscriminator3D, ViewAttentionAlignment,
                         X2CTGenerator, build_discriminator, build_generator, count_parameters,
                         expand_along, set_output_prior)
from cvaa.models.baselines import FCBottleneck, SkipLinker, X2CTEncoder
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
@pytest.mark.parametrize("name", ["cvaa", "x2ct"])
def test_two_view_generator_paper_size_forward(name):
    torch.manual_seed(0)
    g = build_generator(name, load_config("paper")).eval()
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


# --- X2CT-GAN (kylekma/X2CT d2_multiview2500, see docs/x2ct_mapping.md) ----------------

def test_x2ct_cpu_preset_output_and_size():
    cfg = load_config("cpu", overrides=["model.generator=x2ct"])
    torch.manual_seed(0)
    g = build_generator("x2ct", cfg)
    assert isinstance(g, X2CTGenerator) and g.uses_discriminator
    # the encoders' widths are CVAA-GAN's (model.encoder_channels), as at the paper preset;
    # x2ct / cvaa = 1.53 here, 1.65 at the paper preset
    assert [b.encoder.channels for b in (g.branch_pa, g.branch_lat)] == [(8, 16, 24, 28)] * 2
    assert count_parameters(g) == 331_585
    assert list(g.buffers()) == []                            # per-sample instance norm only
    out = g(xrays(2, 32))
    assert out.shape == (2, 1, 32, 32, 32) and 0.0 < out.min() and out.max() < 1.0


def test_x2ct_paper_parameter_count_matches_the_original():
    g = build_generator("x2ct", load_config("paper"))

    def n(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    # The original's 61,740,467 less the branches' never-trained tails, 2 x (6,928 + 5,489).
    assert count_parameters(g) == 61_715_633
    assert count_parameters(g) == pytest.approx(61.7e6, rel=0.02)
    for b in (g.branch_pa, g.branch_lat):                     # per view, as measured there
        assert b.encoder.channels == (64, 128, 256, 512, 512, 704)
        assert n(b.encoder) == 13_569_984
        assert [n(s) for s in b.encoder.stages] == [402_560, 1_190_144, 3_920_384, 5_017_088,
                                                    3_036_608]
        assert n(b.link) == 11_550_720
        assert [n(m) for m in b.linkers] == [7_968, 8_992, 35_904, 143_488, 508_160]
        assert n(b.compress, b.body) == 3_553_776 - 6_928
    assert n(g.fused_compress, g.fused_body, g.head) == 2_971_505
    assert g.view_blocks == (1, 2, 2, 2, 2, 0) and g.fused_blocks == (1, 1, 1, 1, 1, 0)


def _x2ct_expected_shapes(size: int) -> dict[str, tuple[int, ...]]:
    """The original's shape tables (spec section 2) for the default widths at ``size``."""
    s = [size // 2 ** k for k in range(6)]                    # 128: 128, 64, ..., 4
    enc = [(64, s[0]), (128, s[1]), (256, s[2]), (512, s[3]), (512, s[4]), (704, 1)]
    linker = [16, 16, 32, 64, 128]                            # linker k reads encoder scale k
    dec = [256, 128, 64, 32, 16, 16]                          # level j (deepest first)
    up = [128, 64, 32, 16, 16]                                # after level j's upsampling
    out = {}
    for v in ("pa", "lat"):
        out.update({f"encoder_{v}.{k}": (1, c, e, e) for k, (c, e) in enumerate(enc)})
        out[f"fc_{v}"] = (1, 256) + (s[5],) * 3
        out.update({f"skip_{v}.{5 - k}": (1, linker[k]) + (s[k],) * 3 for k in range(5)})
        out.update({f"view_{v}.{j}": (1, up[j]) + (s[4 - j],) * 3 for j in range(5)})
    out.update({f"mean.{j}": (1, dec[j]) + (s[5 - j],) * 3 for j in range(6)})
    out.update({f"fused.{j}": (1, up[j]) + (s[4 - j],) * 3 for j in range(5)})
    out["fused.5"] = (1, 16) + (size,) * 3
    out["out"] = (1, 1) + (size,) * 3
    return out


def test_x2ct_feature_shapes_follow_the_original_tables():
    # The paper widths and five stages at 64^2 (the spec's tables with every extent halved:
    # 64 -> 2, instead of 128 -> 4) keep the test on a CPU.
    torch.manual_seed(0)
    g = X2CTGenerator(64).eval()
    with torch.no_grad():
        feats = g.features(xrays(1, 64))
    assert {k: tuple(v.shape) for k, v in feats.items()} == _x2ct_expected_shapes(64)


def test_x2ct_cpu_preset_feature_shapes():
    g = build_generator("x2ct", cpu_config()).eval()          # 3 stages: 32 -> 4
    with torch.no_grad():
        feats = g.features(xrays(1, 32))
    shapes = {k: tuple(v.shape) for k, v in feats.items() if k.endswith("pa") or "_pa." in k
              or k.startswith(("mean", "fused", "out"))}
    assert shapes == {
        "encoder_pa.0": (1, 8, 32, 32), "encoder_pa.1": (1, 16, 16, 16),
        "encoder_pa.2": (1, 24, 8, 8), "encoder_pa.3": (1, 28, 1, 1),
        "fc_pa": (1, 32, 4, 4, 4),
        "skip_pa.1": (1, 16, 8, 8, 8), "skip_pa.2": (1, 8, 16, 16, 16),
        "skip_pa.3": (1, 8, 32, 32, 32),
        "view_pa.0": (1, 16, 8, 8, 8), "view_pa.1": (1, 8, 16, 16, 16),
        "view_pa.2": (1, 8, 32, 32, 32),
        "mean.0": (1, 32, 4, 4, 4), "mean.1": (1, 16, 8, 8, 8), "mean.2": (1, 8, 16, 16, 16),
        "mean.3": (1, 8, 32, 32, 32),
        "fused.0": (1, 16, 8, 8, 8), "fused.1": (1, 8, 16, 16, 16),
        "fused.2": (1, 8, 32, 32, 32), "fused.3": (1, 8, 32, 32, 32),
        "out": (1, 1, 32, 32, 32),
    }


def test_x2ct_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    g = build_generator("x2ct", cpu_config())
    x = xrays(2, 32)
    F.mse_loss(g(x), torch.rand(2, 1, 32, 32, 32)).backward()
    params = dict(g.named_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    live = {n for n, p in params.items() if p.grad.abs().max() > 1e-8}
    # Every weight learns; of the biases only those that no instance norm cancels: the FC
    # links', the output conv's, and in the last encoder stage (pooled, not normalised)
    # the stride-2 conv's and the dense layers' 3x3 convs'.
    last = len(g.branch_pa.encoder.stages) - 1
    expected = {"head.conv.bias"}
    for b in ("branch_pa", "branch_lat"):
        expected |= {f"{b}.link.fc.1.bias", f"{b}.encoder.stages.{last}.2.bias",
                     f"{b}.encoder.stages.{last}.3.layers.5.bias"}   # cpu: 1 dense layer
    assert live == {n for n in params if not n.endswith(".bias")} | expected
    assert _inert(g, x, sorted(set(params) - live))


def test_x2ct_skip_linker_equals_copy_then_conv3d_as_in_the_original():
    """The plane computation equals X2CT-GAN's Dimension_UpsampleCutBlock (copy along a new
    dim 2, zero-padded 3^3 conv, IN3d, ReLU) followed by its permutation into the CT frame:
    (0, 1, 3, 2, 4) for the PA branch ([H, D, W]), (0, 1, 3, 4, 2) for the lateral ([W, D, H])."""
    torch.manual_seed(0)
    for axis, perm in (("H", (0, 1, 3, 2, 4)), ("W", (0, 1, 3, 4, 2))):
        for size in (2, 3, 7):
            m = SkipLinker(3, 4, axis).double()
            x = torch.randn(2, 3, size, size, dtype=torch.float64)
            with torch.no_grad():
                copies = m.reduce(x).unsqueeze(2).expand(-1, -1, size, size, size)
                ref = F.relu(F.instance_norm(F.conv3d(copies, m.conv.weight, m.conv.bias,
                                                      padding=1)))
                torch.testing.assert_close(m(x), ref.permute(*perm), rtol=1e-10, atol=1e-10)


def test_x2ct_views_are_copied_along_their_projection_axes():
    torch.manual_seed(0)
    g = build_generator("x2ct", cpu_config()).eval()
    x = xrays(1, 32)
    y = x.clone()
    y[:, 1] = torch.rand(32, 32)                              # another lateral view
    with torch.no_grad():
        fx, fy = g.features(x), g.features(y)
    for j in (1, 2, 3):
        for view, dim, other in (("pa", 3, 4), ("lat", 4, 3)):  # PA copies along H, lateral W
            skip = fx[f"skip_{view}.{j}"]                     # (1, C, D, H, W)
            inner = skip.narrow(dim, 1, skip.shape[dim] - 2)
            # Constant along the projection axis (the zero padding of the original's 3^3
            # conv makes the two end slices differ), varying along D and the image columns.
            assert torch.equal(inner, inner.narrow(dim, 0, 1).expand_as(inner))
            assert not torch.equal(skip.narrow(dim, 0, 1), inner.narrow(dim, 0, 1))
            assert not torch.allclose(inner, inner.narrow(other, 0, 1).expand_as(inner))
            assert not torch.allclose(inner, inner.narrow(2, 0, 1).expand_as(inner))
        # The PA branch's encoding depends on the PA image only.
        assert torch.equal(fx[f"skip_pa.{j}"], fy[f"skip_pa.{j}"])
        assert not torch.allclose(fx[f"skip_lat.{j}"], fy[f"skip_lat.{j}"])
    assert torch.equal(fx["fc_pa"], fy["fc_pa"]) and not torch.equal(fx["fc_lat"], fy["fc_lat"])
    assert not torch.allclose(fx["out"], fy["out"])


@pytest.mark.parametrize("axis, perm", [("H", (0, 1, 3, 2, 4)), ("W", (0, 1, 3, 4, 2))])
def test_fc_bottleneck_reshapes_in_the_view_frame_then_permutes(axis, perm):
    torch.manual_seed(0)
    m = FCBottleneck(6, 3, 4, axis).eval()
    x = torch.randn(2, 6, 1, 1)
    raw = m.fc(x).view(2, 3, 4, 4, 4)                         # (copy, rows, cols) as X2CT-GAN
    assert torch.equal(m(x), raw.permute(*perm))


def test_x2ct_fused_mean_replaces_both_branch_features():
    torch.manual_seed(0)
    g = build_generator("x2ct", cpu_config()).eval()
    with torch.no_grad():
        f = g.features(xrays(1, 32))
        torch.testing.assert_close(f["mean.0"], (f["fc_pa"] + f["fc_lat"]) / 2)
        for j in (0, 1, 2):                                   # backToSub: both continue from it
            torch.testing.assert_close(f[f"view_pa.{j}"], g.branch_pa.body[j](f[f"mean.{j}"]))
            torch.testing.assert_close(f[f"view_lat.{j}"], g.branch_lat.body[j](f[f"mean.{j}"]))
        for j in (1, 2, 3):
            pa = g.branch_pa.compress[j - 1](f[f"view_pa.{j - 1}"], f[f"skip_pa.{j}"])
            lat = g.branch_lat.compress[j - 1](f[f"view_lat.{j - 1}"], f[f"skip_lat.{j}"])
            torch.testing.assert_close(f[f"mean.{j}"], (pa + lat) / 2)
            fused = g.fused_body[j](g.fused_compress[j - 1](f[f"mean.{j}"], f[f"fused.{j - 1}"]))
            torch.testing.assert_close(f[f"fused.{j}"], fused)


def test_x2ct_checkpointing_gives_identical_outputs_and_gradients():
    cfg = cpu_config()
    torch.manual_seed(0)
    plain = build_generator("x2ct", cfg).eval()               # eval: no dropout draws
    ckpt = build_generator("x2ct", cfg.override(["model.checkpoint=true"])).eval()
    assert ckpt.checkpoint and not plain.checkpoint
    ckpt.load_state_dict(plain.state_dict())
    x = xrays(1, 32)
    results = []
    for m in (plain, ckpt):
        out = m(x)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_x2ct_encoder_halves_channels_and_pools_the_last_stage():
    enc = X2CTEncoder(1, 8, 4, (1, 2, 3))
    assert enc.channels == (8, 6, 7, 19)                      # (8+4)//2, (6+8)//2, 7+12
    feats = enc(torch.rand(2, 1, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 32, 32), (2, 6, 16, 16), (2, 7, 8, 8),
                                               (2, 19, 1, 1)]
    wide = X2CTEncoder(1, 8, 4, (1, 2, 3), transitions=(16, 24))
    assert wide.channels == (8, 16, 24, 36)                   # 24 + 3 * 4 pooled
    with pytest.raises(ValueError, match="transitions needs one entry per stage"):
        X2CTEncoder(1, 8, 4, (1, 2, 3), transitions=(16,))


@pytest.mark.parametrize("kwargs, match", [
    (dict(decoder_channels=(32, 16, 8)), "decoder_channels"),
    (dict(size=36), "size 36"),
    (dict(size=8), "deepest scale"),                           # 8 / 2^3 = 1
    (dict(view_blocks=(1, 2, 0)), "view_blocks"),
    (dict(fused_blocks=(1, 1, 1, 1)), r"fused_blocks\[-1\]"),
    (dict(decoder_channels=(32, 0, 8, 8)), r"decoder_channels\[1\]"),
])
def test_x2ct_validates_its_arguments(kwargs, match):
    args = dict(size=32, stem_channels=8, growth=4, dense_layers=(1, 1, 1),
                decoder_channels=(32, 16, 8, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        X2CTGenerator(**args)


def test_x2ct_config_validation():
    # Five stages leave 32 / 2^5 = 1: too deep for x2ct.
    five = ["model.dense_layers=[1,1,1,1,1]", "model.encoder_channels=[8,8,8,8,8]",
            "model.decoder_channels=[8,8,8,8,8,8]"]
    with pytest.raises(ConfigError, match="deepest scale"):
        load_config("cpu", overrides=["model.generator=x2ct", *five])
    # both take their transition widths from model.encoder_channels, one per stage
    for name in ("x2ct", "cvaa"):
        with pytest.raises(ConfigError, match="encoder_channels"):
            load_config("cpu", overrides=[f"model.generator={name}", "model.encoder_channels=[8]"])
    with pytest.raises(ConfigError, match="decoder_channels"):
        load_config("cpu", overrides=["model.generator=x2ct", "model.decoder_channels=[8,8]"])


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


def _inert(g: torch.nn.Module, x: torch.Tensor, names: list[str]) -> bool:
    """Whether the output of ``g`` (eval mode) ignores the named parameters: each is
    shifted by a random amount and the output must not move."""
    params = dict(g.named_parameters())
    g.eval()
    with torch.no_grad():
        before = g(x)
        for name in names:
            params[name].add_(torch.randn_like(params[name]) * 0.1)
        after = g(x)
    g.train()
    return torch.allclose(before, after, atol=1e-5, rtol=0)


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
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in g.parameters())
    dead = _dead(g)
    if name == "x2ct":
        # X2CT-GAN keeps a bias on every conv, also where an instance norm without affine
        # parameters follows and cancels it: those (and only biases) get no gradient, and
        # the output does not depend on them.
        assert dead and all(n.endswith(".bias") for n in dead)
        assert _inert(g, x, dead)
    else:
        assert dead == []
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
