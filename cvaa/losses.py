"""Losses of CVAA-GAN (paper II.B): LSGAN, MSE reconstruction, projection L1.

Pure functions of tensors. Volumes are ``(B, 1, D, H, W)``; discriminator outputs are
patch maps of any shape. The generator's total is weighted by ``LossConfig``::

    fake = G(xrays)
    loss_d = lsgan_d_loss(D(xrays, volume), D(xrays, fake.detach()))
    total, parts = generator_loss(fake, volume, D(xrays, fake), cfg.loss)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cvaa.config import LossConfig


def batch_mean(values: torch.Tensor, sample_weight: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Mean of ``values`` ``(B, ...)``: over every element, or with ``sample_weight``
    ``(B,)`` (summing to 1) the weighted mean of the per-sample means. Samples have equal
    sizes, so uniform weights ``1/B`` give the plain mean: a short batch padded with
    weight-0 samples has the loss of the short batch.

    Example:
        >>> v = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
        >>> batch_mean(v).item(), batch_mean(v, torch.tensor([1.0, 0.0])).item()
        (4.0, 2.0)
    """
    if sample_weight is None:
        return values.mean()
    return (values.reshape(values.shape[0], -1).mean(dim=1) * sample_weight).sum()


def lsgan_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor,
                 sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Discriminator LSGAN loss, eq. (1): ``E[(D(X, Y) - 1)^2] + E[D(X, G(X))^2]``.

    Args:
        d_real: D's patch scores on real volumes ``D(X, Y)``.
        d_fake: D's patch scores on generated volumes ``D(X, G(X))`` (detached from G).
        sample_weight: ``(B,)`` weights of the samples' means (:func:`batch_mean`).

    Example:
        >>> lsgan_d_loss(torch.ones(2, 1, 3, 3, 3), torch.zeros(2, 1, 3, 3, 3)).item()
        0.0
    """
    return (batch_mean((d_real.float() - 1) ** 2, sample_weight)
            + batch_mean(d_fake.float() ** 2, sample_weight))


def lsgan_g_loss(d_fake: torch.Tensor, sample_weight: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Generator LSGAN loss, eq. (1): ``E[(D(X, G(X)) - 1)^2]``."""
    return batch_mean((d_fake.float() - 1) ** 2, sample_weight)


def _check_volumes(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 5:
        raise ValueError(f"pred and target must both be (B, C, D, H, W), got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor,
                        sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Voxel-wise MSE ``E[(Y - G(X))^2]`` (paper II.B.2)."""
    _check_volumes(pred, target)
    if sample_weight is None:
        return F.mse_loss(pred.float(), target.float())
    return batch_mean((pred.float() - target.float()) ** 2, sample_weight)


def projection_loss(pred: torch.Tensor, target: torch.Tensor,
                    sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """L1 between orthogonal mean projections along D, H and W, averaged over the three.

    The axial, coronal and sagittal projections of paper II.B.2 (orthogonal, not
    perspective: they check shape consistency, not X-ray physics).

    Example:
        >>> y = torch.zeros(1, 1, 4, 4, 4)
        >>> projection_loss(y + 0.25, y).item()
        0.25
    """
    _check_volumes(pred, target)
    pred, target = pred.float(), target.float()
    if sample_weight is None:
        return sum(F.l1_loss(pred.mean(dim=axis), target.mean(dim=axis))
                   for axis in (2, 3, 4)) / 3
    return sum(batch_mean((pred.mean(dim=axis) - target.mean(dim=axis)).abs(), sample_weight)
               for axis in (2, 3, 4)) / 3


def generator_loss(pred: torch.Tensor, target: torch.Tensor, d_fake: torch.Tensor | None,
                   weights: "LossConfig", sample_weight: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted generator objective ``adv * L_adv + rec * L_rec + proj * L_proj``.

    Args:
        pred: ``G(X)``, ``(B, 1, D, H, W)``.
        target: ``Y``, same shape.
        d_fake: ``D(X, G(X))`` (not detached), or ``None`` for generators trained without
            a discriminator (then there is no adversarial term).
        weights: the loss weights (``cfg.loss``).
        sample_weight: ``(B,)`` weights of the samples' means, summing to 1
            (:func:`batch_mean`); ``None``: every sample alike.

    Returns:
        The total (a scalar with grad) and the unweighted parts, detached:
        ``{"adv": ..., "rec": ..., "proj": ..., "total": ...}`` (``adv`` only with D).
    """
    parts = {"rec": reconstruction_loss(pred, target, sample_weight),
             "proj": projection_loss(pred, target, sample_weight)}
    total = weights.rec * parts["rec"] + weights.proj * parts["proj"]
    if d_fake is not None:
        parts["adv"] = lsgan_g_loss(d_fake, sample_weight)
        total = total + weights.adv * parts["adv"]
    out = {k: v.detach() for k, v in parts.items()}
    out["total"] = total.detach()
    return total, out


__all__ = ["batch_mean", "lsgan_d_loss", "lsgan_g_loss", "reconstruction_loss", "projection_loss",
           "generator_loss"]
