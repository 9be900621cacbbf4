"""``train.compile`` (cvaa.gan): the compiled step tracks the eager one, compiles once,
and its checkpoints are the eager model's.

Compiling costs time on a CPU (Inductor generates and builds C++ kernels): each generator
is compiled once here and shared by the tests (16^3 volumes, 16^2 X-rays, the narrow
widths of tests/test_gan.py). ``cvaa`` (the paper's model, with D) runs by default; the
other generators are ``slow``; the ``gpu`` variant runs all four on CUDA.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from cvaa.config import ConfigError, load_config
from cvaa.gan import GANTrainer, make_optimizer, resolve_compile
from cvaa.models import build_discriminator, build_generator

# tests/test_gan.py's narrow widths at 16^3 / 16^2 (three encoder stages: 16 -> 2).
SMALL = ["model.stem_channels=4", "model.growth=2", "model.encoder_channels=[8,8,8]",
         "model.decoder_channels=[8,8,4,4]", "model.unet_channels=[4,8,8]",
         "model.disc_channels=[4,8,8]", "model.disc_expand_channels=2",
         "preprocess.size=16", "drr.detector_pixels=16"]
STEPS = 20
PADDING_STEP = 10          # weight 0, as the stream pads a rank that is a step short
# Measured on CPU (2-core VM, fp32, 20 steps, every loss at every step, compiled vs
# eager): max relative difference <= 4e-4 (see the report). Inductor reorders and fuses
# float32 sums, so the trajectories drift apart by rounding only; 5e-3 leaves >10x margin
# and still fails on a real change of the maths (a dropped term, a wrong weight, a frozen
# D that trains, a skipped update: each moves some loss by > 1e-2 within a few steps).
RTOL = 5e-3


def _trainer(name: str, compile: str, device: str = "cpu", precision: str = "fp32",
             extra: tuple[str, ...] = ()) -> GANTrainer:
    cfg = load_config("cpu", overrides=[f"model.generator={name}", f"train.compile={compile}",
                                        f"train.precision={precision}", *SMALL, *extra])
    torch.manual_seed(0)
    g = build_generator(name, cfg).to(device)
    d = build_discriminator(cfg).to(device) if g.uses_discriminator else None
    return GANTrainer(g, d, cfg, torch.device(device))


def _batches(device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(STEPS):
        xrays = torch.rand(1, 2, 16, 16, generator=gen)                 # (B, 2, P, P)
        ct = torch.rand(1, 1, 16, 16, 16, generator=gen)                # (B, 1, D, H, W)
        out.append((xrays.to(device), ct.to(device), 0.0 if i == PADDING_STEP else 1.0))
    return out


def _run(trainer: GANTrainer, device: str = "cpu") -> list[dict[str, float]]:
    """Losses of every step; from the third step on any recompilation is an error (the
    first two compile G, D with gradients and D frozen, forward and backward)."""
    losses = []
    for i, (xrays, ct, weight) in enumerate(_batches(device)):
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            out = trainer.step(xrays, ct, weight=weight)
        losses.append({k: float(v) for k, v in out.items()})
    return losses


@functools.lru_cache(maxsize=None)
def _eager_and_compiled(name: str, device: str = "cpu"):
    eager = _trainer(name, "none", device)
    eager_losses = _run(eager, device)
    graphs = counters["stats"]["unique_graphs"]
    compiled = _trainer(name, "default", device)
    compiled_losses = _run(compiled, device)
    return (eager, eager_losses, compiled, compiled_losses,
            counters["stats"]["unique_graphs"] - graphs)


def _max_rel(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    return max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b) for k in x)


def _check_tracks_eager(name: str, device: str = "cpu") -> None:
    _, ref, trainer, got, graphs = _eager_and_compiled(name, device)
    assert trainer.compile_mode == "default"
    assert ref[0].keys() == got[0].keys() and ("loss_d" in ref[0]) == (name in ("cvaa", "x2ct"))
    print(f"{name} on {device}: max relative loss difference over {STEPS} steps "
          f"{_max_rel(ref, got):.2e}")
    for step, (a, b) in enumerate(zip(ref, got)):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=RTOL), (step, key, a[key], b[key])
    # It did compile (G; D twice: with gradients and frozen), and trained: losses moved.
    assert graphs >= (3 if name in ("cvaa", "x2ct") else 1)
    assert got[-1]["loss_g"] != got[0]["loss_g"]


def test_compiled_step_tracks_eager_cvaa():
    _check_tracks_eager("cvaa")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["x2ct", "3dcnn", "psr"])
def test_compiled_step_tracks_eager(name):
    _check_tracks_eager(name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cvaa", "x2ct", "3dcnn", "psr"])
def test_compiled_step_tracks_eager_on_cuda(name):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _check_tracks_eager(name, "cuda")
    assert _eager_and_compiled(name, "cuda")[2].opt_g.defaults["fused"] is True


def test_checkpoints_move_between_compiled_and_eager_trainers():
    eager, _, compiled, _, _ = _eager_and_compiled("cvaa")
    state = compiled.state_dict()
    for key in ("generator", "discriminator"):
        assert not any("_orig_mod" in k for k in state[key]), key
        assert state[key].keys() == eager.state_dict()[key].keys()
    xrays, ct, _ = _batches()[0]
    # compiled -> eager: the next step of each gives the same losses
    fresh = _trainer("cvaa", "none")
    fresh.load_state_dict(state)
    a = {k: float(v) for k, v in fresh.step(xrays, ct).items()}
    b = {k: float(v) for k, v in compiled.step(xrays, ct).items()}
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=RTOL) for k in a)
    # eager -> compiled: loads into the module the compiled callables wrap
    compiled.load_state_dict(eager.state_dict())
    eager_params = [p for p in eager.generator.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(eager_params, compiled.generator.parameters()))
    c = {k: float(v) for k, v in compiled.step(xrays, ct).items()}
    e = {k: float(v) for k, v in eager.step(xrays, ct).items()}
    assert all(c[k] == pytest.approx(e[k], rel=RTOL) for k in e)


@pytest.mark.slow
def test_compile_runs_under_bf16_autocast_on_cpu():
    """bf16 autocast inside the compiled forwards (3dcnn: the smallest graph)."""
    ref = _run(_trainer("3dcnn", "none", precision="bf16"))
    got = _run(_trainer("3dcnn", "default", precision="bf16"))
    # bf16 rounding differs between fused and unfused kernels: the tolerance of
    # tests/test_gan.py's bf16-vs-fp32 comparison.
    for a, b in zip(ref, got):
        assert all(b[k] == pytest.approx(a[k], rel=2e-2) for k in a)


def test_resolve_compile_and_the_optimiser():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cpu) == "none"
    assert resolve_compile("auto", cuda) == "default"
    for mode in ("none", "default", "max-autotune", "cudagraphs"):
        assert resolve_compile(mode, cpu) == resolve_compile(mode, cuda) == mode
    with pytest.raises(ValueError, match="train.compile='fast'"):
        resolve_compile("fast", cpu)
    with pytest.raises(ConfigError, match="train.compile"):
        load_config("cpu", overrides=["train.compile=fast"])
    assert load_config("cpu").train.compile == "auto"
    # On a CPU, torch's default (foreach), not the CUDA-only fused kernel.
    opt = make_optimizer(torch.nn.Linear(2, 2).parameters(), 1e-3, load_config("cpu").optim)
    assert opt.defaults["fused"] is None
    trainer = _trainer("3dcnn", "auto")
    assert trainer.compile_mode == "none" and trainer._generator is trainer.generator
