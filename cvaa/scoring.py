"""Run a generator over prepared cases and tabulate the paper's Table I metrics.

Pure torch + numpy (no Ray, no MLflow): used by training (validation and the final test
table) and by ``jobs/evaluate.py``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

from cvaa.metrics import evaluate_batch, summarize

# Table I columns in the paper's order, for each metric convention.
TABLE_COLUMNS = {
    "volume": [("MAE", "mae"), ("MSE", "mse"), ("Cosine", "cosine"), ("PSNR", "psnr"),
               ("SSIM", "ssim")],
    "x2ct": [("PSNR (x2ct)", "psnr_x2ct"), ("SSIM (x2ct)", "ssim_x2ct")],
}


@torch.no_grad()
def predict(generator: nn.Module, xrays: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """``(N, 2, P, P)`` -> ``(N, 1, D, H, W)``, in batches, in eval mode."""
    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    try:
        outs = [generator(xrays[i:i + batch_size].to(device)).float().cpu()
                for i in range(0, xrays.shape[0], batch_size)]
    finally:
        generator.train(was_training)
    return torch.cat(outs)


@torch.no_grad()
def evaluate_cases(generator: nn.Module, items: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   batch_size: int = 4) -> list[dict[str, float]]:
    """Per-case metrics (both conventions) for ``(xrays (2,P,P), ct (1,D,H,W))`` items."""
    results: list[dict[str, float]] = []
    batch_x, batch_y = [], []

    def flush():
        if batch_x:
            pred = predict(generator, torch.stack(batch_x), batch_size)
            results.extend(evaluate_batch(pred.clamp(0, 1), torch.stack(batch_y)))
            batch_x.clear()
            batch_y.clear()

    for xrays, ct, *_ in items:
        batch_x.append(xrays)
        batch_y.append(ct)
        if len(batch_x) == batch_size:
            flush()
    flush()
    return results


def table_rows(per_model: dict[str, Sequence[dict[str, float]]]) -> list[dict[str, Any]]:
    """One row per model: ``{"model", "cases", "<metric>_mean", "<metric>_std", ...}``."""
    rows = []
    for name, results in per_model.items():
        row: dict[str, Any] = {"model": name, "cases": len(results)}
        for key, (mean, std) in summarize(results).items():
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        rows.append(row)
    return rows


def _fmt(key: str, mean: float, std: float) -> str:
    if key in ("mae", "mse"):
        return f"{mean:.5f} ({std:.1e})"
    if key.startswith("psnr"):
        return f"{mean:.2f} ({std:.2f})"
    return f"{mean:.4f} ({std:.4f})"


def table_markdown(rows: Sequence[dict[str, Any]], conventions=("volume", "x2ct")) -> str:
    """Table I as Markdown: rows = models, columns ``mean (std)``."""
    cols = [c for conv in conventions for c in TABLE_COLUMNS[conv]]
    lines = ["| Model | Cases | " + " | ".join(h for h, _ in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for r in rows:
        cells = [_fmt(k, r[f"{k}_mean"], r[f"{k}_std"]) for _, k in cols]
        lines.append(f"| {r['model']} | {r['cases']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
