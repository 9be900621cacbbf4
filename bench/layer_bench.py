"""Per-layer forward and backward times of every generator and the discriminator.

One training-mode forward of each model records every conv-like layer's inputs (shape,
strides, dtype, whether they need a gradient): convolutions (``nn.Conv*``,
``ConcatConv``, transposed convs), ``SkipLinker`` (X2CT-GAN's 2D -> 3D conv) and the
instance norms. Each layer is then run alone on fresh random inputs of exactly those
shapes and strides (stride-0 expanded views stay stride-0), forward then backward to its
parameters and inputs, and timed: ``torch.cuda.Event`` pairs on CUDA (synchronised),
``time.perf_counter`` on CPU; the median of ``--repeats`` after ``--warmup`` runs, the
layouts compared alternated run by run. The D is recorded as in the G step: the volume
needs a gradient. A last line per model gives the whole model's forward + backward time.

    python bench/layer_bench.py --preset cpu                         # quick, on CPU
    python bench/layer_bench.py --device cuda --precision bf16 --batch 4 \\
        --layout contiguous channels_last --top 25                   # the paper preset

Prints one markdown table per model, sorted by forward + backward time: the layer's
name, kind, input shape(s), channels, kernel/stride, ms per layout and, when two layouts
are compared, their ratio. "reformulated" says what the tensor-core reformulations of
``cvaa.models.blocks`` do to the layer on this device (docs/performance.md, "Layers"):

- ``GEMM``: a kernel == stride transposed conv computed as a matrix product on CUDA
  (``transposed_conv_no_overlap``). On the H200 profile (paper preset, batch 4, bf16) the
  ``dgrad2d_grouped_direct_kernel`` call (30.5 ms, CVAA-GAN only) and the four
  ``wgrad2d_grouped_direct_kernel`` calls (5.4 ms) sit under
  ``aten::cudnn_convolution_transpose`` (5 calls, 30.7 ms): CVAA-GAN's five ``UpConv``
  ConvTranspose3d (k2 s2); the 30.5 ms one is by its size the 64^3 -> 128^3 16 -> 16 one
  (``fusions.3.up.0``). X2CT-GAN's k3 transposed convs have no such call.
- ``C_in a->b`` / ``C_out a->b``: channel counts padded to multiples of 8 on CUDA
  (``conv_padded``). ``implicit_convolveNd_sgemm`` (3 calls, 25 ms) and
  ``wgrad_alg1_nd_float_engine`` (1 call, 20.5 ms) appear in the CVAA-GAN and X2CT-GAN
  profiles alike and not in 3DCNN's (no D): they are the discriminator's first conv
  ``net.0.conv`` on its 1-channel part, the 128^3 volume (k4 s2, 1 -> 64): forward in the
  D step (batch 8, real + fake) and in the G step (batch 4), and the weight gradient of
  the D step. The 1- and 2-output convs (VAA ``mix`` 7^3, FD ``gate``, the heads) are
  padded too.
- ``layout``: the instance norms, whose replacement keeps channels-last tensors as they
  are (PyTorch's copies them to contiguous and back); contiguous inputs still go through
  PyTorch's kernel.

``(CUDA)`` marks a change that applies on CUDA only (on a CPU it would only add work).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from cvaa.config import load_config  # noqa: E402
from cvaa.models import build_discriminator, build_generator  # noqa: E402
from cvaa.models.baselines import SkipLinker  # noqa: E402
from cvaa.models.blocks import (TENSOR_CORE_CHANNELS, ConcatConv, InstanceNorm,  # noqa: E402
                                tensor_core_multiple)
from cvaa.models.layout import tensor_to_memory_format, to_memory_format  # noqa: E402

MODELS = ("cvaa", "x2ct", "3dcnn", "psr", "D")
# Layers timed as a whole; their submodules are not timed again.
COMPOSITE = (ConcatConv, SkipLinker)
LEAF = (nn.modules.conv._ConvNd, InstanceNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class Recorded:
    """One call of a layer: its module and the layout of each input."""

    name: str
    module: nn.Module
    shapes: list[tuple[int, ...]]
    strides: list[tuple[int, ...]]
    grads: list[bool]
    times: dict[str, tuple[float, float]] = field(default_factory=dict)


def describe(m: nn.Module, shapes: list[tuple[int, ...]]) -> tuple[str, str, str]:
    """``(kind, channels, kernel/stride)`` of a layer."""
    conv = m.conv if isinstance(m, ConcatConv) else m
    if isinstance(m, SkipLinker):
        conv = m.conv
        return "SkipLinker", f"{shapes[0][1]}->{conv.out_channels}", "1 + 3^3 (as 2D)"
    if isinstance(conv, nn.modules.conv._ConvNd):
        kind = ("ConvT" if conv.transposed else "Conv") + f"{len(conv.kernel_size)}d"
        if isinstance(m, ConcatConv) and len(m.splits) > 1:
            kind = f"ConcatConv{len(conv.kernel_size)}d"
        c_in = "+".join(str(s[1]) for s in shapes)
        return kind, f"{c_in}->{conv.out_channels}", f"k{conv.kernel_size[0]} s{conv.stride[0]}"
    return type(m).__name__, str(shapes[0][1]), "-"


def reformulation(m: nn.Module, shapes: list[tuple[int, ...]], device: torch.device) -> str:
    """What ``cvaa.models.blocks`` changes in this layer ('' if nothing); channel padding
    happens on CUDA only and is shown as ``(CUDA) ...`` on other devices."""
    cuda_only = "" if tensor_core_multiple(device) > 1 else "(CUDA) "
    if isinstance(m, InstanceNorm):
        return "layout"
    if isinstance(m, SkipLinker):
        return ""
    conv = m.conv if isinstance(m, ConcatConv) else m
    if not isinstance(conv, nn.modules.conv._ConvNd):
        return ""
    if conv.transposed:
        no_overlap = conv.kernel_size == conv.stride and not any(conv.padding)
        return cuda_only + "GEMM" if no_overlap else ""
    # A one-element stride-0 stand-in: _use_fft only reads the device and the shape.
    if (device.type == "cpu" and isinstance(m, ConcatConv)
            and m._use_fft(torch.empty(1).expand(shapes[0]))):
        return "(FFT on CPU)"
    multiple = TENSOR_CORE_CHANNELS
    notes = [f"C_in {c}->{-(-c // multiple) * multiple}" for c in (s[1] for s in shapes)
             if c % multiple]
    if conv.out_channels % multiple:
        notes.append(f"C_out {conv.out_channels}->{-(-conv.out_channels // multiple) * multiple}")
    return cuda_only + ", ".join(notes) if notes else ""


def record(model: nn.Module, inputs: list[torch.Tensor]) -> list[Recorded]:
    """Run ``model(*inputs)`` once in training mode and record its conv-like layers."""
    calls: list[Recorded] = []
    skip: set[int] = set()
    for m in model.modules():
        if isinstance(m, COMPOSITE):
            skip.update(id(s) for s in m.modules() if s is not m)
    hooks = []
    for name, m in model.named_modules():
        if id(m) in skip or not isinstance(m, COMPOSITE + LEAF):
            continue

        def hook(mod, args, name=name):
            ts = [a for a in args if isinstance(a, torch.Tensor)]
            calls.append(Recorded(name, mod, [tuple(t.shape) for t in ts],
                                  [tuple(t.stride()) for t in ts],
                                  [t.requires_grad for t in ts]))
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def fresh_input(shape, stride, requires_grad: bool, device, dtype) -> torch.Tensor:
    """Random tensor with exactly ``shape`` and ``stride`` (stride-0 views included)."""
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    base = torch.randn(extent, device=device, dtype=dtype)
    return base.as_strided(shape, stride).detach().requires_grad_(requires_grad)


def time_layer(rec: Recorded, device, dtype, amp, warmup: int, repeats: int
               ) -> tuple[float, float]:
    """Median forward and backward ms of one recorded call, run alone."""
    xs = [fresh_input(s, st, g, device, dtype) for s, st, g in zip(rec.shapes, rec.strides,
                                                                   rec.grads)]
    params = [p for p in rec.module.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    fwd, bwd = [], []
    for i in range(warmup + repeats):
        if cuda:
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            torch.cuda.synchronize()
            e0.record()
        else:
            t0 = time.perf_counter()
        with amp():
            out = rec.module(*xs)
        if cuda:
            e1.record()
        else:
            t1 = time.perf_counter()
        wrt = params + [x for x in xs if x.requires_grad]
        if wrt and out.requires_grad:
            grad = torch.ones_like(out)                 # same layout as the output
            torch.autograd.grad(out, wrt, grad)
        if cuda:
            e2.record()
            torch.cuda.synchronize()
            f, b = e0.elapsed_time(e1), e1.elapsed_time(e2)
        else:
            t2 = time.perf_counter()
            f, b = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        if i >= warmup:
            fwd.append(f)
            bwd.append(b)
        del out
    return statistics.median(fwd), statistics.median(bwd)


def build(name: str, cfg) -> nn.Module:
    return build_discriminator(cfg) if name == "D" else build_generator(name, cfg)


def model_inputs(name: str, batch: int, size: int, device, layout: str) -> list[torch.Tensor]:
    xrays = tensor_to_memory_format(torch.rand(batch, 2, size, size, device=device), layout)
    if name != "D":
        return [xrays]
    volume = tensor_to_memory_format(torch.rand(batch, 1, size, size, size, device=device),
                                     layout)
    return [xrays, volume.requires_grad_(True)]             # as in the G step


def table(name: str, recs: list[Recorded], layouts: list[str], device, top: int | None) -> str:
    first = layouts[0]
    recs = sorted(recs, key=lambda r: -sum(r.times[first]))
    head = ["layer", "kind", "input", "channels", "k/s"]
    for lay in layouts:
        head += [f"fwd ms ({lay})", f"bwd ms ({lay})"]
    if len(layouts) == 2:
        head.append(f"{layouts[1]} / {layouts[0]}")
    head.append("reformulated")
    lines = [f"### {name}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * 5 + "---:|" * (2 * len(layouts) + (len(layouts) == 2)) + "---|"]
    shown = recs if top is None else recs[:top]
    for r in shown:
        kind, ch, ks = describe(r.module, r.shapes)
        shape = " + ".join("x".join(map(str, s)) for s in r.shapes)
        row = [f"`{r.name}`", kind, shape, ch, ks]
        for lay in layouts:
            row += [f"{r.times[lay][0]:.3f}", f"{r.times[lay][1]:.3f}"]
        if len(layouts) == 2:
            a, b = sum(r.times[layouts[0]]), sum(r.times[layouts[1]])
            row.append(f"{b / a:.2f}" if a > 0 else "-")
        note = reformulation(r.module, r.shapes, device)
        row.append(f"**{note}**" if note and not note.startswith("(FFT") else note)
        lines.append("| " + " | ".join(row) + " |")
    totals = []
    for lay in layouts:
        f = sum(r.times[lay][0] for r in recs)
        b = sum(r.times[lay][1] for r in recs)
        totals.append(f"{lay}: fwd {f:.1f} ms + bwd {b:.1f} ms = {f + b:.1f} ms")
    lines += ["", f"{len(recs)} layer calls ({len(shown)} shown); sums over all: "
              + "; ".join(totals), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper", help="config preset (paper: 128^3; cpu: 32^3)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--layout", nargs="+", default=["contiguous"],
                   choices=("contiguous", "channels_last"),
                   help="one layout, or two to compare (the first sorts the table)")
    p.add_argument("--warmup", type=int, default=None, help="default: 3 on CUDA, 1 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="default: 10 on CUDA, 3 on CPU")
    p.add_argument("--top", type=int, default=None, help="rows per model (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or ("bf16" if cuda else "fp32")
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    repeats = args.repeats if args.repeats is not None else (10 if cuda else 3)

    def amp():
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    cfg = load_config(args.preset, overrides=args.set)
    size = cfg.preprocess.size
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"# Layer times: preset {args.preset} ({size}^3), batch {args.batch}, {device} "
          f"({where}), "
          f"{precision}, torch {torch.__version__}, median of {repeats} after {warmup} warm-up\n")
    print("`python " + " ".join(["bench/layer_bench.py", *sys.argv[1:]]) + "`\n")
    for name in args.models:
        torch.manual_seed(0)
        # One copy of the model per layout, so that the layouts can be timed alternately
        # (layer by layer, round by round): a load that drifts during the run then
        # weighs on both columns alike.
        first = build(name, cfg).to(device).train()
        models = {lay: to_memory_format(copy.deepcopy(first) if i else first, lay)
                  for i, lay in enumerate(args.layout)}
        recs_by_layout: dict[str, list[Recorded]] = {}
        for lay, model in models.items():
            with amp():
                recs_by_layout[lay] = record(model, model_inputs(name, args.batch, size,
                                                                 device, lay))
        base = recs_by_layout[args.layout[0]]
        for i, rec in enumerate(base):
            samples: dict[str, list[tuple[float, float]]] = {lay: [] for lay in args.layout}
            for r in range(warmup + repeats):
                order = args.layout if r % 2 == 0 else args.layout[::-1]
                for lay in order:
                    t = time_layer(recs_by_layout[lay][i], device, torch.float32, amp, 0, 1)
                    if r >= warmup:
                        samples[lay].append(t)
            for lay in args.layout:
                rec.times[lay] = (statistics.median(f for f, _ in samples[lay]),
                                  statistics.median(b for _, b in samples[lay]))
        print(table(name, base, args.layout, device, args.top))
        print(whole_model_line(name, models, args.batch, size, device, amp, warmup, repeats))
        del models, first, base, recs_by_layout
        if cuda:
            torch.cuda.empty_cache()


def whole_model_line(name: str, models: dict[str, nn.Module], batch: int, size: int, device,
                     amp, warmup: int, repeats: int) -> str:
    """Median forward + backward ms of each whole model (layouts alternated)."""
    cuda = device.type == "cuda"
    samples: dict[str, list[float]] = {lay: [] for lay in models}
    inputs = {lay: model_inputs(name, batch, size, device, lay) for lay in models}
    for r in range(warmup + repeats):
        for lay in (list(models) if r % 2 == 0 else list(models)[::-1]):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with amp():
                out = models[lay](*inputs[lay])
            out.float().mean().backward()
            if cuda:
                torch.cuda.synchronize()
            if r >= warmup:
                samples[lay].append((time.perf_counter() - t0) * 1e3)
            models[lay].zero_grad(set_to_none=True)
    parts = [f"{lay} {statistics.median(v):.1f} ms" for lay, v in samples.items()]
    ratio = ""
    if len(samples) == 2:
        a, b = (statistics.median(v) for v in samples.values())
        ratio = f" (ratio {b / a:.2f})"
    return f"Whole {name} forward + backward, batch {batch}: " + ", ".join(parts) + ratio + "\n"


if __name__ == "__main__":
    main()
