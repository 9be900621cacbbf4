"""The CPU convolution path of large kernels (cvaa.models.blocks, ``model.cpu_conv``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cvaa.config import Config, ConfigError, load_config
from cvaa.models import GENERATORS, ConcatConv, build_generator
from cvaa.models.blocks import (available_memory_bytes, choose_cpu_conv, fft_conv3d,
                                fft_conv_bytes)
from cvaa.models.fusion import ViewAttentionAlignment

MODES = ("auto", "fft", "direct")
PAPER_INPUT, PAPER_WEIGHT = (1, 32, 128, 128, 128), (2, 32, 7, 7, 7)   # VAA's conv at 128^3
GiB = 2**30


def count_fft_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr("cvaa.models.blocks.fft_conv3d",
                        lambda *a: calls.append(1) or fft_conv3d(*a))
    return calls


# --- the estimate and the decision ---------------------------------------------------

def test_fft_conv_bytes_counts_complex64_half_spectra_of_input_weight_and_output():
    # 6^3 input, 3^3 kernel -> 8^3 grid -> 8 * 8 * 5 half-spectrum bins; B=2, C_in=3, C_out=4.
    bins, operands, output = 8 * 8 * 5, 2 * 3 + 4 * 3, 2 * 4
    forward = fft_conv_bytes((2, 3, 6, 6, 6), (4, 3, 3, 3, 3), backward=False)
    assert forward == (2 * operands + output) * bins * 8
    with_backward = fft_conv_bytes((2, 3, 6, 6, 6), (4, 3, 3, 3, 3))
    assert with_backward == (3 * operands + 2 * output) * bins * 8
    assert 2.8e9 < fft_conv_bytes(PAPER_INPUT, PAPER_WEIGHT) < 3.0e9


@pytest.mark.parametrize("available, expected",
                         [(64 * GiB, "fft"), (2 * GiB, "direct"), (0, "direct")])
def test_auto_takes_the_fft_only_within_half_the_available_memory(available, expected):
    assert choose_cpu_conv("auto", PAPER_INPUT, PAPER_WEIGHT, available) == expected


def test_auto_budget_boundary_and_forward_only_estimate():
    need = fft_conv_bytes(PAPER_INPUT, PAPER_WEIGHT)
    assert choose_cpu_conv("auto", PAPER_INPUT, PAPER_WEIGHT, 2 * need) == "fft"
    assert choose_cpu_conv("auto", PAPER_INPUT, PAPER_WEIGHT, 2 * need - 2) == "direct"
    # Without a backward pass the FFT needs less: fits where training would not.
    forward = fft_conv_bytes(PAPER_INPUT, PAPER_WEIGHT, backward=False)
    assert forward < need
    assert choose_cpu_conv("auto", PAPER_INPUT, PAPER_WEIGHT, 2 * forward, backward=False) == "fft"
    assert choose_cpu_conv("auto", PAPER_INPUT, PAPER_WEIGHT, 2 * forward) == "direct"


@pytest.mark.parametrize("mode", ["fft", "direct"])
@pytest.mark.parametrize("available", [0, 1 << 50])
def test_forced_modes_ignore_the_memory(mode, available):
    assert choose_cpu_conv(mode, PAPER_INPUT, PAPER_WEIGHT, available) == mode


def test_unknown_mode_is_rejected_naming_the_argument():
    with pytest.raises(ValueError, match="cpu_conv must be one of"):
        choose_cpu_conv("cufft", PAPER_INPUT, PAPER_WEIGHT, GiB)
    with pytest.raises(ValueError, match="cpu_conv must be one of"):
        ConcatConv(3, (2, 2), 2, kernel_size=7, cpu_conv="cufft")


def test_available_memory_is_a_positive_byte_count():
    assert available_memory_bytes() > 1 << 20


# --- through the module --------------------------------------------------------------

def test_fft_and_direct_give_the_same_outputs_and_gradients(monkeypatch):
    torch.manual_seed(0)
    splits, shape = (3, 5), (9, 10, 11)
    fft = ConcatConv(3, splits, 2, kernel_size=7, cpu_conv="fft").double()
    direct = ConcatConv(3, splits, 2, kernel_size=7, cpu_conv="direct").double()
    direct.load_state_dict(fft.state_dict())
    xs = [torch.randn(2, c, *shape, dtype=torch.float64, requires_grad=True) for c in splits]
    g = torch.randn(2, 2, *shape, dtype=torch.float64)
    results = {}
    for name, m in (("fft", fft), ("direct", direct)):
        calls = count_fft_calls(monkeypatch)
        out = m(*xs)
        assert bool(calls) == (name == "fft"), f"cpu_conv={name} took the other path"
        params = [*xs, m.conv.weight, m.conv.bias]
        results[name] = (out, torch.autograd.grad((out * g).sum(), params))
    (out_f, grads_f), (out_d, grads_d) = results["fft"], results["direct"]
    torch.testing.assert_close(out_f, out_d, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_f, grads_d):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("available, takes_fft", [(1 << 50, True), (1024, False)])
def test_auto_module_follows_the_available_memory(monkeypatch, available, takes_fft):
    monkeypatch.setattr("cvaa.models.blocks.available_memory_bytes", lambda: available)
    m = ConcatConv(3, (2, 2), 2, kernel_size=7)                # cpu_conv="auto" by default
    calls = count_fft_calls(monkeypatch)
    m(torch.randn(1, 2, 6, 6, 6), torch.randn(1, 2, 6, 6, 6))
    assert bool(calls) == takes_fft


def test_auto_module_counts_the_backward_only_when_gradients_are_needed(monkeypatch):
    x = torch.randn(1, 2, 6, 6, 6)
    forward = fft_conv_bytes((1, 4, 6, 6, 6), (2, 4, 7, 7, 7), backward=False)
    # Budget (half the available) covers the forward spectra but not the gradients'.
    monkeypatch.setattr("cvaa.models.blocks.available_memory_bytes", lambda: 2 * forward)
    m = ConcatConv(3, (2, 2), 2, kernel_size=7)
    calls = count_fft_calls(monkeypatch)
    m(x, x)
    assert not calls                                           # weights need gradients
    with torch.no_grad():
        m(x, x)
    assert calls                                               # inference fits


def test_forced_fft_still_needs_a_large_stride_1_kernel():
    x = torch.zeros(1, 4, 8, 8, 8)
    assert not ConcatConv(3, (2, 2), 2, kernel_size=3, cpu_conv="fft")._use_fft(x)
    assert not ConcatConv(3, (2, 2), 2, kernel_size=7, stride=2, cpu_conv="fft")._use_fft(x)
    assert ConcatConv(3, (2, 2), 2, kernel_size=7, cpu_conv="fft")._use_fft(x)


# --- config and generators -----------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_config_accepts_the_three_modes(mode):
    assert load_config("cpu", overrides=[f"model.cpu_conv={mode}"]).model.cpu_conv == mode


def test_config_rejects_other_modes_and_defaults_to_auto():
    with pytest.raises(ConfigError, match="model.cpu_conv"):
        load_config("cpu", overrides=["model.cpu_conv=bogus"])
    cfg = load_config("cpu")
    assert cfg.model.cpu_conv == "auto"
    old = cfg.to_dict()
    del old["model"]["cpu_conv"]                               # a config saved before the key
    assert Config.from_dict(old) == cfg


@pytest.mark.parametrize("name", sorted(GENERATORS))
@pytest.mark.parametrize("mode", MODES)
def test_every_generator_builds_with_each_mode(name, mode):
    cfg = load_config("cpu", overrides=[f"model.generator={name}", f"model.cpu_conv={mode}"])
    g = build_generator(name, cfg)
    vaas = [m for m in g.modules() if isinstance(m, ViewAttentionAlignment)]
    assert bool(vaas) == (name == "cvaa")
    assert all(v.mix.cpu_conv == mode for v in vaas)


def test_cvaa_generator_is_the_same_function_on_both_paths():
    cfg = load_config("cpu")
    torch.manual_seed(0)
    fft = build_generator("cvaa", dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, cpu_conv="fft"))).eval()
    direct = build_generator("cvaa", dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, cpu_conv="direct"))).eval()
    direct.load_state_dict(fft.state_dict())
    x = torch.rand(1, 2, cfg.preprocess.size, cfg.preprocess.size,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fft(x), direct(x), rtol=1e-4, atol=1e-5)
