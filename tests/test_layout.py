"""cvaa.models.layout: one memory layout for a whole model, the same function."""

import hashlib

import pytest
import torch

from cvaa.config import load_config
from cvaa.models import build_discriminator, build_generator
from cvaa.models.layout import (resolve_memory_format, tensor_to_memory_format,
                                to_memory_format)

MODELS = ["cvaa", "x2ct", "3dcnn", "psr", "D"]
# 16^2 X-rays: the cpu preset's networks, 8x fewer voxels than its 32^3 (fast tests).
SMALL = ["preprocess.size=16", "drr.detector_pixels=16"]


def _build(name: str, cfg):
    return build_discriminator(cfg) if name == "D" else build_generator(name, cfg)


def _run(model, name: str, xrays, volume):
    return model(xrays, volume) if name == "D" else model(xrays)


def test_auto_is_channels_last_on_cuda_only_and_unknown_formats_are_rejected():
    assert resolve_memory_format("auto", torch.device("cuda")) == "channels_last"
    assert resolve_memory_format("auto", torch.device("cpu")) == "contiguous"
    assert resolve_memory_format("channels_last", torch.device("cpu")) == "channels_last"
    with pytest.raises(ValueError, match="memory_format must be one of"):
        resolve_memory_format("nhwc", torch.device("cpu"))
    with pytest.raises(ValueError, match="resolve 'auto'"):
        to_memory_format(torch.nn.Conv2d(1, 1, 1), "auto")


def test_the_config_field_defaults_to_auto_and_rejects_unknown_values():
    assert load_config("cpu").train.memory_format == "auto"
    assert load_config("cpu", overrides=["train.memory_format=channels_last"]
                       ).train.memory_format == "channels_last"
    with pytest.raises(ValueError, match="memory_format"):
        load_config("cpu", overrides=["train.memory_format=nhwc"])


def test_two_view_generator_converts_2d_and_3d_weights_by_rank():
    # model.to(memory_format=channels_last_3d) fails on the 2D encoders' 4-D weights.
    g = build_generator("cvaa", load_config("cpu", overrides=SMALL))
    with pytest.raises(RuntimeError, match="rank 5"):
        g.to(memory_format=torch.channels_last_3d)
    to_memory_format(g, "channels_last")
    ranks = {p.dim() for p in g.parameters()}
    assert {4, 5} <= ranks
    for p in g.parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
        if p.dim() == 5:
            assert p.is_contiguous(memory_format=torch.channels_last_3d)
        if p.dim() in (4, 5) and p.shape[1] > 1 and p.shape[2:].numel() > 1:
            assert not p.is_contiguous()                  # really converted
    to_memory_format(g, "contiguous")
    assert all(p.is_contiguous() for p in g.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_model_computes_the_same_and_its_state_dict_loads_into_an_eager_model(
        name, tmp_path):
    cfg = load_config("cpu", overrides=SMALL)
    torch.manual_seed(0)
    ref = _build(name, cfg).eval()                        # eval: X2CT-GAN's dropout off
    conv = _build(name, cfg).eval()
    conv.load_state_dict(ref.state_dict())
    to_memory_format(conv, "channels_last")
    xrays, volume = torch.rand(2, 2, 16, 16), torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        expected = _run(ref, name, xrays, volume)
        got = _run(conv, name, tensor_to_memory_format(xrays, "channels_last"),
                   tensor_to_memory_format(volume, "channels_last"))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # The state_dict of the converted model: same keys, loads into a fresh eager model.
        path = tmp_path / "model.pt"
        torch.save(conv.state_dict(), path)
        fresh = _build(name, cfg).eval()
        fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
        torch.testing.assert_close(_run(fresh, name, xrays, volume), expected,
                                   atol=1e-5, rtol=1e-5)


# sha256 (first 16 hex digits) of the sorted "key:shape" lines of each model's state_dict
# and its parameter count, at the cpu preset, computed with the code before the layer
# reformulations (commit 7540b79): an old checkpoint loads with strict=True.
OLD_STATE_DICTS = {
    "cvaa": ("e0f6d47d037b8627", 217026),
    "x2ct": ("78a2bf5f4e6a5b5e", 331585),
    "3dcnn": ("e5f2bbb0bbd30297", 191581),
    "psr": ("81cd0e52e3b77300", 218976),
    "D": ("4615704e9894c088", 48033),
}


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_keys_shapes_and_parameter_counts_are_those_of_the_old_modules(name):
    m = _build(name, load_config("cpu"))
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(m.state_dict().items()))
    digest = hashlib.sha256(lines.encode()).hexdigest()[:16]
    assert (digest, sum(p.numel() for p in m.parameters())) == OLD_STATE_DICTS[name]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_every_conv_and_norm_output_stays_channels_last():
    # (CPU conv3d returns contiguous outputs whatever the layout, so this needs cuDNN.)
    cfg = load_config("cpu", overrides=SMALL)
    g = to_memory_format(build_generator("cvaa", cfg), "channels_last").cuda()
    bad = []

    def check(module, inputs, out):
        # Channels innermost (stride 1): channels-last, or a channel slice of it (the
        # padded convs' outputs), not NCHW / NCDHW.
        if out.dim() in (4, 5) and out.shape[1] > 1 and out.stride(1) != 1:
            bad.append((type(module).__name__, tuple(out.shape), out.stride()))

    from cvaa.models.blocks import Conv2d, Conv3d, InstanceNorm
    for m in g.modules():
        if isinstance(m, (Conv2d, Conv3d, InstanceNorm)):
            m.register_forward_hook(check)
    with torch.no_grad():
        g(tensor_to_memory_format(torch.rand(2, 2, 16, 16, device="cuda"), "channels_last"))
    assert bad == []


def test_the_trainer_steps_in_the_configured_layout_and_tracks_the_contiguous_step():
    """``train.memory_format=channels_last``: GANTrainer converts G and D before its
    optimisers hold them, steps channels-last batches and computes the contiguous losses."""
    from cvaa.gan import GANTrainer

    losses = {}
    for fmt in ("contiguous", "channels_last"):
        cfg = load_config("cpu", overrides=[f"train.memory_format={fmt}",
                                            "model.stem_channels=4", "model.growth=2",
                                            "model.encoder_channels=[8,8,8]",
                                            "model.decoder_channels=[8,8,8,8]",
                                            "model.disc_channels=[4,8,8]"])
        torch.manual_seed(0)
        g, d = build_generator("cvaa", cfg), build_discriminator(cfg)
        trainer = GANTrainer(g, d, cfg)
        assert trainer.memory_format == fmt
        conv3d = next(p for p in g.parameters() if p.dim() == 5 and p.shape[1] > 1)
        assert conv3d.is_contiguous(memory_format=torch.channels_last_3d) == (
            fmt == "channels_last")
        torch.manual_seed(1)
        batch = (torch.rand(2, 2, 32, 32), torch.rand(2, 1, 32, 32, 32))
        losses[fmt] = [{k: float(v) for k, v in trainer.step(*batch).items()}
                       for _ in range(2)]
    for a, b in zip(losses["contiguous"], losses["channels_last"]):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
