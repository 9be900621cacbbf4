"""Per-voxel uncertainty from test-time sampling: the X-rays as given plus ``K - 1``
perturbations drawn from the train-time randomisation (:func:`cvaa.data.augment.perturb_xrays`),
through the generator in ONE forward pass of batch ``K``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from cvaa.config import Config
from cvaa.data.augment import perturb_xrays, sample_params


def sample_xrays(xrays: torch.Tensor, cfg: Config, k: int, seed: int = 0) -> torch.Tensor:
    """The X-rays as given and ``k - 1`` perturbed copies, ``(K, 2, P, P)``.

    Each copy's draw comes from ``cfg.augment``'s ranges (never the clean draw), seeded by
    ``(seed, index)`` so that an assessment is reproducible.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ranges = replace(cfg.augment, clean_fraction=0.0)
    fov_mm = cfg.preprocess.size * float(cfg.preprocess.spacing_mm)
    out = [xrays.float()]
    for index in range(1, k):
        rng = np.random.default_rng([seed, index])
        params = sample_params(ranges, rng)
        noise = torch.Generator().manual_seed(int(rng.integers(2**31)))
        out.append(perturb_xrays(xrays, params, cfg.drr.log_scale, fov_mm,
                                 generator=noise))
    return torch.stack(out)


@torch.no_grad()
def estimate_with_uncertainty(generator: nn.Module, xrays: torch.Tensor, cfg: Config,
                              k: int = 8, seed: int = 0
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimate and its per-voxel uncertainty from one forward pass of batch ``k``.

    Args:
        generator: the generator (its device is used; put in eval mode for the call).
        xrays: ``(2, P, P)`` in [0, 1].
        k: forward samples: the X-rays as given plus ``k - 1`` perturbed copies.

    Returns:
        ``(estimate, uncertainty)``, each ``(1, 1, S, S, S)`` on the CPU: the output for
        the X-rays as given (what :func:`cvaa.inference.reconstruct` returns) and the
        standard deviation of the ``k`` outputs (0 for ``k = 1``), in normalised units.
    """
    device = next(generator.parameters()).device
    batch = sample_xrays(torch.as_tensor(xrays).cpu(), cfg, k, seed).to(device)
    was_training = generator.training
    generator.eval()
    try:
        out = generator(batch).float().clamp(0, 1).cpu()                 # (K, 1, S, S, S)
    finally:
        generator.train(was_training)
    spread = out.std(dim=0, keepdim=True) if k > 1 else torch.zeros_like(out[:1])
    return out[:1], spread


__all__ = ["sample_xrays", "estimate_with_uncertainty"]
