"""DICOM discovery at archive scale: header reading rate per worker, whole discovery time
and memory, on a synthetic export of >= 50,000 files (tiny 8x8 images, PACS-like tags).

    python bench/dicom_index_bench.py                  # 190 studies = 50,540 files
    python bench/dicom_index_bench.py --studies 20     # quick look

The export is written to a temporary folder (deleted at the end), nested
``PATnnnn/STUDY/SERIES/IMnnnnn`` without extensions; each study holds a localizer, an axial
soft-tissue series (96 slices), the same in a bone kernel, a thick axial series (48), a
coronal reformat (24) and a dose SR: 266 files, one case. Prints:

* the header rate in this process (one worker: ``read_header`` one file after another),
  per wall second and per CPU second (the rate of a worker with a core to itself), over
  the synthetic files and over the real series in ../shared/data/dicom_series;
* whole discovery (listing, headers on ``--workers`` Ray Data workers, grouping,
  selection) of the whole export: seconds and files/s per worker;
* the driver's Python memory (tracemalloc, in separate runs since tracing slows it)
  during discovery of a subset (``--subset`` studies) and of the whole export: what is
  held after (the result) and the peak (listing + index + transient), per file at both
  counts: peak = constant + bytes/file x files means memory grows with the index only;
* the header reader's peak memory over 1,000 and over 5,000 files (flat: nothing kept).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cvaa.config import load_config  # noqa: E402
from cvaa.data.dicom_export import (SeriesTags, StudyTags, report_dataset,  # noqa: E402
                                    slice_datasets, uid)
from cvaa.data.dicom_index import read_header  # noqa: E402
from cvaa.data.io import Volume  # noqa: E402

SHARED_SERIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom_series"


def write_study(root: Path, n: int) -> int:
    """Study ``n`` of the synthetic export under ``root``; returns the files written."""
    rng = np.random.default_rng(n)
    array = rng.normal(0, 50, (96, 8, 8)).astype(np.float32)
    array[:, :2] = -1000.0
    vol = Volume(array, (40.0, 40.0, 1.0), (-140.0, -140.0, 48.0),
                 (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    patient = f"PAT{n:05d}"
    study = StudyTags(patient, uid("bench-study", n))

    def tags(k: int, description: str, **kw) -> SeriesTags:
        return SeriesTags(uid("bench-series", n, k), k, description, **kw)

    series = [
        slice_datasets(vol, study, tags(1, "Topogram", image_type=(
            "ORIGINAL", "PRIMARY", "LOCALIZER")), plane="coronal")[3:4],
        slice_datasets(vol, study, tags(2, "Abdomen 1.0 B30f")),
        slice_datasets(vol, study, tags(3, "Abdomen 1.0 B70f", kernel="B70f")),
        slice_datasets(vol, study, tags(4, "Abdomen 2.0 B30f"), every=2),
        slice_datasets(Volume(rng.normal(0, 50, (8, 24, 8)).astype(np.float32),
                              (40.0, 12.0, 12.0), vol.origin_mm, vol.direction), study,
                       tags(5, "Cor MPR", image_type=("DERIVED", "SECONDARY", "MPR")),
                       plane="coronal"),
        [report_dataset(study, tags(6, "Dose Report", modality="SR"))],
    ]
    count = 0
    for number, datasets in enumerate(series, 1):
        folder = root / patient / "STUDY1" / f"SER{number}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, ds in enumerate(datasets):
            ds.save_as(folder / f"IM{i:05d}", enforce_file_format=True)
            count += 1
    return count


def header_rate(files: list[str], repeats: int = 1) -> tuple[float, float]:
    """``read_header`` in this process: ``(files per wall second, files per CPU second)``.
    On a machine shared with other work the second is the rate of one worker that has a
    core to itself."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for f in files:
            read_header(f)
    n = len(files) * repeats
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def reader_peak(files: list[str]) -> int:
    """tracemalloc peak (bytes) while reading ``files``' headers one after another."""
    tracemalloc.start()
    for f in files:
        read_header(f)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def discover(source: Path, workers: int, *, trace: bool) -> tuple[float, int, int, int, int]:
    """Whole discovery on Ray: ``(seconds, files, cases, held bytes, peak bytes)``; the
    bytes (tracemalloc in this driver process, which slows it) only with ``trace``."""
    from cvaa.distributed.pipeline import discover_inputs

    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    found = discover_inputs(str(source), load_config("paper"), None, workers=workers,
                            log=lambda *_: None)
    seconds = time.perf_counter() - start
    held, peak = tracemalloc.get_traced_memory() if trace else (0, 0)
    tracemalloc.stop()
    assert found.summary["cases"] == found.summary["studies"], found.summary
    return seconds, found.summary["files"], found.summary["cases"], held, peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=190, help="studies (266 files each)")
    p.add_argument("--subset", type=int, default=38, help="studies in the smaller count")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    from cvaa.distributed.cluster import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="cvaa-dicom-bench-"))
    try:
        start = time.perf_counter()
        small, rest = tmp / "export" / "a", tmp / "export" / "b"
        files = sum(write_study(small if n < args.subset else rest, n)
                    for n in range(args.studies))
        print(f"wrote {files} files ({args.studies} studies) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        listed = sorted(str(f) for f in (tmp / "export").rglob("IM*"))
        sample = listed[:2000]
        header_rate(sample[:200])  # warm-up: imports, page cache
        wall, cpu = header_rate(sample)
        print(f"read_header, 1 process: {wall:.0f} files/s wall, {cpu:.0f} files per CPU "
              f"second (synthetic, {len(sample)} files)", flush=True)
        real = sorted(str(f) for f in SHARED_SERIES.iterdir()) if SHARED_SERIES.is_dir() \
            else []
        if real:
            wall, cpu = header_rate(real, repeats=25)
            print(f"read_header, 1 process: {wall:.0f} files/s wall, {cpu:.0f} files per "
                  f"CPU second (real Siemens CT, 4.8 KB header, {len(real)} files x 25)",
                  flush=True)
        for n in (1000, 5000):
            print(f"read_header peak memory over {n} files: "
                  f"{reader_peak(listed[:n]) / 1e6:.2f} MB", flush=True)

        init_ray(num_cpus=args.workers)
        discover(small, args.workers, trace=False)  # warm-up: Ray workers, their imports
        seconds, n, cases, _, _ = discover(tmp / "export", args.workers, trace=False)
        print(f"discovery of {n} files ({cases} cases), {args.workers} workers: "
              f"{seconds:.1f} s = {n / seconds:.0f} files/s = "
              f"{n / seconds / args.workers:.0f} files/s per worker", flush=True)
        for source in (small, tmp / "export"):
            seconds, n, cases, held, peak = discover(source, args.workers, trace=True)
            print(f"traced discovery of {n} files: driver memory held after "
                  f"{held / 1e6:.1f} MB ({held / n:.0f} B/file), peak {peak / 1e6:.1f} MB "
                  f"({peak / n:.0f} B/file)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
