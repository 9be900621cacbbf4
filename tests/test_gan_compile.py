"""``train.compile`` (cvaa.gan): the compiled step tracks the eager one, compiles once,
and its checkpoints are the eager model's.

Compiling costs time on a CPU (Inductor generates and builds C++ kernels): each generator
is compiled once here and shared by the tests (16^3 volumes, 16^2 X-rays, the narrow
widths of tests/test_gan.py). ``3dcnn`` (the cheapest to compile) runs by default; the
generators with D (``cvaa``, ``x2ct``: D compiled with gradients and frozen) and ``psr``
are ``slow``; the ``gpu`` variant runs all four on CUDA.
"""

from __future__ import annotations

import copy
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
# The two trainers step in lockstep: before every step the compiled one loads the eager
# one's state (weights, Adam moments), so each of the 20 steps compares one step's
# numerics at a real point of training. Run freely, a GAN amplifies rounding: measured
# on CPU, 20 free compiled vs eager steps of cvaa differed by up to 5.7e-2 (loss_adv from
# step 13 on), which no tolerance can tell from a real change.
# Measured (2-core VM, fp32, 20 lockstep steps, cold compile): relative loss difference
# <= 7.6e-7 (cvaa), 5.9e-7 (x2ct), 1.7e-7 (3dcnn, psr); 1 - cosine of the weight updates
# <= 7.2e-7 (cvaa), 6.1e-4 (x2ct), 8.6e-6 (3dcnn), 1.5e-4 (psr). The bounds leave > 10x
# (losses) and > 15x (updates: 1 - cosine <= 1e-2) and still fail on a real change of
# the maths: a dropped loss term or a wrong weight moves a loss by > 1e-3; a missing or
# wrong gradient (D trained in the G step, a skipped update) turns the update away (a
# dropout mask drawn apart already gave 1 - cosine = 0.74 and 3e-2 in loss).
RTOL = 1e-5
MIN_COSINE = 0.99


# What a CUDA run takes, on the CPU (train.cuda_shaped): channel padding to multiples of
# 8, the GEMM transposed conv, the layout-keeping norm, channels-last, fused Adam. The
# finiteness check reads every step (as on a CPU) so that both trainers step alike.
CUDA_SHAPED = ("train.cuda_shaped=true", "train.finite_check_every=1")


def _trainer(name: str, compile: str, device: str = "cpu", precision: str = "fp32",
             extra: tuple[str, ...] = CUDA_SHAPED) -> GANTrainer:
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


def _weights(trainer: GANTrainer) -> torch.Tensor:
    models = [trainer.generator] + ([trainer.discriminator] if trainer.discriminator else [])
    return torch.cat([p.detach().flatten().clone() for m in models for p in m.parameters()])


def _lockstep(eager: GANTrainer, compiled: GANTrainer, device: str = "cpu"):
    """Per step: both trainers from the eager one's state, one step each on the same batch.
    Returns both trainers' losses and the cosine of their weight updates, per step. From
    the third step on any recompilation is an error (the first two compile G, D with
    gradients and D frozen, forward and backward)."""
    ref, got, cosines = [], [], []
    # x2ct's FC link has dropout: both steps draw their masks from the same seed, through
    # eager's RNG (Inductor's own RNG, the default, draws other masks).
    for i, (xrays, ct, weight) in enumerate(_batches(device)):
        random = torch._inductor.config.patch(fallback_random=True)
        # A copy: Optimizer.load_state_dict keeps the tensors it is given (same dtype and
        # device), so the two trainers' Adam moments would be one.
        compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
        before = _weights(eager)
        torch.manual_seed(i)
        with torch._dynamo.config.patch(error_on_recompile=i >= 2), random:
            out = compiled.step(xrays, ct, weight=weight)
        torch.manual_seed(i)
        ref.append({k: float(v) for k, v in eager.step(xrays, ct, weight=weight).items()})
        got.append({k: float(v) for k, v in out.items()})
        cosines.append(float(torch.nn.functional.cosine_similarity(
            _weights(eager) - before, _weights(compiled) - before, dim=0)))
    return ref, got, cosines


@functools.lru_cache(maxsize=None)
def _eager_and_compiled(name: str, device: str = "cpu"):
    eager = _trainer(name, "none", device)
    compiled = _trainer(name, "default", device)
    graphs = counters["stats"]["unique_graphs"]
    ref, got, cosines = _lockstep(eager, compiled, device)
    return eager, compiled, ref, got, cosines, counters["stats"]["unique_graphs"] - graphs


def _max_rel(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    return max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b) for k in x)


def _check_tracks_eager(name: str, device: str = "cpu") -> None:
    _, trainer, ref, got, cosines, graphs = _eager_and_compiled(name, device)
    assert trainer.compile_mode == "default"
    # every CUDA branch but the kernels (on a CPU through train.cuda_shaped)
    assert trainer.memory_format == "channels_last" and trainer.opt_g.defaults["fused"]
    assert all(m.cuda_shaped for m in trainer.generator.modules() if hasattr(m, "cuda_shaped"))
    assert ref[0].keys() == got[0].keys() and ("loss_d" in ref[0]) == (name in ("cvaa", "x2ct"))
    print(f"{name} on {device}: max relative loss difference over {STEPS} steps "
          f"{_max_rel(ref, got):.2e}, 1 - min update cosine {1 - min(cosines):.2e}")
    for step, (a, b) in enumerate(zip(ref, got)):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=RTOL), (step, key, a[key], b[key])
    assert min(cosines) >= MIN_COSINE, cosines
    # It did compile (G; D twice: with gradients and frozen), and trained: losses moved.
    assert graphs >= (3 if name in ("cvaa", "x2ct") else 1)
    assert ref[-1]["loss_g"] != ref[0]["loss_g"]


# Cold compile + 40 steps each, measured on the 2-core VM: 3dcnn 28 s, psr 70 s, cvaa
# 181 s, x2ct 268 s; by default only 3dcnn runs (the file stays under a minute).
HEAVY = (pytest.mark.slow, pytest.mark.heavy)  # 20-125 s of inductor compile each on 2 cores


@pytest.mark.parametrize("name", [pytest.param("cvaa", marks=HEAVY),
                                  pytest.param("x2ct", marks=HEAVY),
                                  "3dcnn",
                                  pytest.param("psr", marks=HEAVY)])
def test_compiled_step_tracks_eager(name):
    _check_tracks_eager(name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cvaa", "x2ct", "3dcnn", "psr"])
def test_compiled_step_tracks_eager_on_cuda(name):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _check_tracks_eager(name, "cuda")
    assert _eager_and_compiled(name, "cuda")[1].opt_g.defaults["fused"] is True


@pytest.mark.parametrize("name", ["3dcnn", pytest.param("cvaa", marks=HEAVY)])
def test_checkpoints_move_between_compiled_and_eager_trainers(name):
    eager, compiled, *_ = _eager_and_compiled(name)
    state = compiled.state_dict()
    for key in ("generator", "discriminator"):
        assert not any("_orig_mod" in k for k in state[key] or {}), key
        assert (state[key] or {}).keys() == (eager.state_dict()[key] or {}).keys()
    xrays, ct, _ = _batches()[0]
    # compiled -> eager: the next step of each gives the same losses
    fresh = _trainer(name, "none")
    fresh.load_state_dict(copy.deepcopy(state))     # own Adam moments (see _lockstep)
    a = {k: float(v) for k, v in fresh.step(xrays, ct).items()}
    b = {k: float(v) for k, v in compiled.step(xrays, ct).items()}
    # one step from one state on each side (as a lockstep step; 10x RTOL for the order of
    # the loads)
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=10 * RTOL) for k in a)
    # eager -> compiled: loads into the module the compiled callables wrap
    compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    eager_params = [p for p in eager.generator.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(eager_params, compiled.generator.parameters()))
    c = {k: float(v) for k, v in compiled.step(xrays, ct).items()}
    e = {k: float(v) for k, v in eager.step(xrays, ct).items()}
    assert all(c[k] == pytest.approx(e[k], rel=10 * RTOL) for k in e)


@pytest.mark.slow
def test_compile_runs_under_bf16_autocast_on_cpu():
    """bf16 autocast inside the compiled forwards (3dcnn: the smallest graph)."""
    ref, got, _ = _lockstep(_trainer("3dcnn", "none", precision="bf16"),
                            _trainer("3dcnn", "default", precision="bf16"))
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
    trainer = _trainer("3dcnn", "auto", extra=())
    assert trainer.compile_mode == "none" and trainer._generator is trainer.generator
    # train.cuda_shaped: CUDA's choices on a CPU (compile, fused Adam, layout, check)
    shaped = _trainer("3dcnn", "auto", extra=("train.cuda_shaped=true",))
    assert shaped.compile_mode == "default" and shaped.opt_g.defaults["fused"] is True
    assert shaped.memory_format == "channels_last" and shaped.check_every == 25
    assert shaped.precision == "fp32"           # precision follows the real device
