"""Our DRR renderer against diffdrr's Siddon and trilinear renderers: speed and agreement.

All renderers get the same volume (a 128^3 phantom at 2 mm by default, or the real lumbar
CT after prepare_ct), the same attenuation mu = mu_water * (1 + HU / 1000) and the same
geometry (SAD 1000 mm, SID 1500 mm, 128^2 detector covering the 256 mm field of view at
the isocentre = the volume centre): our source and detector-pixel positions are handed to
diffdrr's ``DRR.render`` as world points, so only the renderers differ. Timings are
medians over interleaved repeats in one process (ratios are what compare: the machine may
be shared); agreement is the relative L1 difference of the line integrals,
``sum |ours - theirs| / sum |theirs|``.

    pip install diffdrr --no-deps && pip install fastcore einops torchio "torch==<yours>"
    python bench/drr_bench.py --threads 2 1 --repeats 7          # phantom, 128^3 -> 2 x 128^2
    python bench/drr_bench.py --real --threads 2 1 --repeats 7   # the real lumbar CT

On a shared machine, time both thread counts: with other processes on the cores, every
multi-threaded op waits for a scheduler slice, which costs our many short ops more than
diffdrr's few long ones. Siddon samples voxels nearest-neighbour (exact for a voxelised
volume), we and diffdrr's trilinear renderer sample the trilinear interpolant, so Siddon's
maximum (through the metal) is higher and the small L1 difference is that model gap.

(diffdrr 0.6 declares torchvision, timm, kornia, pyvista[all] ... as requirements, but
``diffdrr.drr`` and ``diffdrr.data`` import only fastcore, einops, torchio and pandas; the
PyPI torchvision does not import beside the CPU build of torch.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cvaa.config import DRRConfig, load_config  # noqa: E402
from cvaa.data.drr import (detector_coords_mm, geometry_from_config, hu_to_mu,  # noqa: E402
                           line_integrals, render_drr)

REAL_CT = ROOT.parent / "shared" / "data" / "ct" / "abdomen_lumbar_3mm.nii.gz"


def load_volume(real: bool, size: int, spacing_mm: float):
    """``(D, H, W)`` HU array (canonical axes) and its Volume, ``size``^3 at ``spacing_mm``."""
    from cvaa.data.phantom import generate_phantom
    from cvaa.data.preprocess import prepare_ct

    cfg = load_config("paper", overrides=[f"preprocess.size={size}", f"drr.detector_pixels={size}",
                                          f"preprocess.spacing_mm={spacing_mm}"])
    if real:
        from cvaa.data.io import read_ct
        return prepare_ct(read_ct(REAL_CT), cfg.preprocess).cube
    return generate_phantom(1, implants=True, shape=(size,) * 3, spacing_mm=spacing_mm).volume


def ray_endpoints_index(view: str, n: int, spacing_mm: float, cfg: DRRConfig):
    """Source and detector-pixel centres as fractional voxel indices ``(i, j, k)`` (x, y, z
    axes of the array: W, H, D), isocentre at the array centre, our geometry and pixel
    order (rows superior -> inferior; PA columns right -> left, lateral anterior ->
    posterior). Returns ``(P*P, 3)`` targets and the ``(3,)`` source."""
    geom = geometry_from_config(cfg, fov_mm=n * spacing_mm)
    det = detector_coords_mm(geom.detector_pixels, geom.pixel_pitch_mm)      # (P,)
    c = (n - 1) / 2
    rows, cols = np.meshgrid(det, det, indexing="ij")                          # (P, P)
    k = c + rows / spacing_mm                 # row offset inferior = +k
    if view == "pa":      # source posterior (+j), detector anterior; columns +i
        source = np.array([c, c + geom.sad_mm / spacing_mm, c])
        i = c + cols / spacing_mm
        j = np.full_like(i, c - (geom.sid_mm - geom.sad_mm) / spacing_mm)
    else:                 # source on the right (-i), detector on the left; columns +j
        source = np.array([c - geom.sad_mm / spacing_mm, c, c])
        j = c + cols / spacing_mm
        i = np.full_like(j, c + (geom.sid_mm - geom.sad_mm) / spacing_mm)
    return np.stack([i, j, k], -1).reshape(-1, 3), source


def build_diffdrr(volume, renderer: str):
    """A diffdrr ``DRR`` holding our mu (not its own HU -> density mapping)."""
    import torchio
    from diffdrr.data import read
    from diffdrr.drr import DRR

    array = volume.array                                          # (D, H, W) = (k, j, i)
    direction = np.asarray(volume.direction, float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(volume.spacing_mm)[None, :]
    lps[:3, 3] = volume.origin_mm
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps                   # torchio/nibabel are RAS
    image = torchio.ScalarImage(tensor=torch.from_numpy(array.transpose(2, 1, 0).copy())[None],
                                affine=ras)
    subject = read(image, orientation=None)
    drr = DRR(subject, sdd=1500.0, height=8, delx=1.0, renderer=renderer)  # detector unused
    mu = hu_to_mu(torch.from_numpy(array.transpose(2, 1, 0).copy()), DRRConfig().mu_water_per_mm)
    drr.density = mu.float()                                       # (I, J, K)
    return drr


def diffdrr_pair(drr, sources_w, targets_w, **kwargs) -> torch.Tensor:
    """PA + lateral line integrals from diffdrr, ``(2, P*P)``, one batched render."""
    with torch.no_grad():
        img = drr.render(drr.density, sources_w, targets_w, **kwargs)   # (2, 1, P*P)
    return img[:, 0]


def to_world(drr, points_index: np.ndarray) -> torch.Tensor:
    affine = drr._affine[0].double()
    pts = torch.as_tensor(points_index, dtype=torch.float64)
    return (pts @ affine[:3, :3].T + affine[:3, 3]).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", action="store_true", help="the real lumbar CT, not a phantom")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--spacing-mm", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="*", default=[],
                    help="torch thread counts to time in turn (default: torch's default)")
    args = ap.parse_args()

    import diffdrr
    volume = load_volume(args.real, args.size, args.spacing_mm)
    n, s = args.size, args.spacing_mm
    cfg = DRRConfig(detector_pixels=n)
    p = cfg.detector_pixels
    hu = torch.from_numpy(volume.array.copy())[None, None]            # (1, 1, D, H, W)

    # Ours: line integrals (for agreement) and the full public call (for time).
    geom = geometry_from_config(cfg, fov_mm=n * s)
    ours_line = line_integrals(hu_to_mu(hu, cfg.mu_water_per_mm), geom, s)[0]  # (2, P, P)

    renderers = {}
    for name in ("siddon", "trilinear"):
        drr = build_diffdrr(volume, name)
        ends = [ray_endpoints_index(v, n, s, cfg) for v in ("pa", "lateral")]
        targets = torch.stack([to_world(drr, t) for t, _ in ends])          # (2, P*P, 3)
        sources = torch.stack([to_world(drr, np.repeat(src[None], p * p, 0))
                               for _, src in ends])                          # (2, P*P, 3)
        renderers[name] = (drr, sources, targets)

    def run_ours():
        return render_drr(hu, cfg, spacing_mm=s)

    calls = {"ours": run_ours}
    for name, (drr, sources, targets) in renderers.items():
        calls[f"diffdrr {name}"] = (lambda d=drr, so=sources, t=targets:
                                    diffdrr_pair(d, so, t))
    results = {k: f() for k, f in calls.items()}                        # warm-up
    what = "real lumbar CT (prepare_ct)" if args.real else "phantom (seed 1, implants)"
    print(f"{what}: {n}^3 at {s:g} mm -> PA + lateral {p}^2; SAD {cfg.sad_mm:g} mm, "
          f"SID {cfg.sid_mm:g} mm; torch {torch.__version__}; diffdrr {diffdrr.__version__}")
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(args.repeats):
            for name, fn in calls.items():                               # interleaved
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        report(times, results, ours_line, p, threads)


def report(times, results, ours_line, p: int, threads: int) -> None:
    print(f"-- {threads} thread(s), median of {len(times['ours'])}")
    ours_ms = statistics.median(times["ours"]) * 1e3
    print(f"{'renderer':<20}{'ms / pair':>12}{'vs ours':>10}{'rel L1 PA':>12}"
          f"{'rel L1 lat':>12}{'max L ours/theirs':>20}")
    for name, t in times.items():
        ms = statistics.median(t) * 1e3
        if name == "ours":
            print(f"{name:<20}{ms:>12.1f}{1.0:>9.1f}x{'-':>12}{'-':>12}"
                  f"{float(ours_line.max()):>20.3f}")
            continue
        theirs = results[name].reshape(2, p, p)
        rel = [(ours_line[v] - theirs[v]).abs().sum() / theirs[v].abs().sum() for v in (0, 1)]
        print(f"{name:<20}{ms:>12.1f}{ms / ours_ms:>9.1f}x{100 * float(rel[0]):>11.2f}%"
              f"{100 * float(rel[1]):>11.2f}%{float(ours_line.max()):>10.3f}/"
              f"{float(theirs.max()):.3f}")


if __name__ == "__main__":
    main()
