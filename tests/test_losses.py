"""LSGAN, reconstruction and projection losses (cvaa.losses)."""

from __future__ import annotations

import pytest
import torch

from cvaa.config import LossConfig
from cvaa.losses import (generator_loss, lsgan_d_loss, lsgan_g_loss, projection_loss,
                         reconstruction_loss)


def test_lsgan_losses_follow_equation_1():
    ones, zeros = torch.ones(2, 1, 3, 3, 3), torch.zeros(2, 1, 3, 3, 3)
    assert lsgan_d_loss(ones, zeros).item() == 0.0            # D perfectly right
    assert lsgan_d_loss(zeros, ones).item() == 2.0            # D perfectly wrong: 1 + 1
    assert lsgan_g_loss(ones).item() == 0.0                   # G fools D
    assert lsgan_g_loss(zeros).item() == 1.0
    d_real = torch.tensor([0.5, 1.5])
    d_fake = torch.tensor([0.2, -0.4])
    # E[(d_real - 1)^2] = 0.25, E[d_fake^2] = (0.04 + 0.16) / 2 = 0.1
    assert lsgan_d_loss(d_real, d_fake).item() == pytest.approx(0.35)
    assert lsgan_g_loss(d_fake).item() == pytest.approx((0.64 + 1.96) / 2)


def test_reconstruction_loss_is_mse():
    y = torch.zeros(1, 1, 4, 4, 4)
    pred = y.clone()
    pred[0, 0, 0, 0, :2] = 1.0                                # 2 of 64 voxels off by 1
    assert reconstruction_loss(pred, y).item() == pytest.approx(2 / 64)


def test_projection_loss_of_a_constant_offset_is_the_offset():
    y = torch.rand(2, 1, 4, 5, 6)
    assert projection_loss(y + 0.25, y).item() == pytest.approx(0.25, abs=1e-6)
    assert projection_loss(y, y).item() == 0.0


def test_projection_loss_sees_only_projections():
    # Swapping two D-slices keeps the projection along D but changes those along H and W.
    y = torch.rand(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    swapped = y[:, :, [1, 0, 2, 3]]
    along_d = (swapped.mean(2) - y.mean(2)).abs().mean()
    assert along_d.item() == pytest.approx(0.0, abs=1e-7)
    expected = sum((swapped.mean(a) - y.mean(a)).abs().mean() for a in (2, 3, 4)) / 3
    assert projection_loss(swapped, y).item() == pytest.approx(expected.item())
    assert projection_loss(swapped, y).item() > 0


def test_generator_loss_weights_its_parts():
    weights = LossConfig(adv=0.1, rec=10.0, proj=5.0)
    y = torch.rand(2, 1, 4, 4, 4)
    pred = (y + 0.1 * torch.randn_like(y)).requires_grad_()
    d_fake = torch.full((2, 1, 2, 2, 2), 0.5)
    total, parts = generator_loss(pred, y, d_fake, weights)
    assert set(parts) == {"adv", "rec", "proj", "total"}
    assert parts["adv"].item() == pytest.approx(0.25)
    assert parts["rec"].item() == pytest.approx(reconstruction_loss(pred, y).item())
    assert parts["proj"].item() == pytest.approx(projection_loss(pred, y).item())
    expected = 0.1 * parts["adv"] + 10.0 * parts["rec"] + 5.0 * parts["proj"]
    assert total.item() == pytest.approx(expected.item())
    assert parts["total"].item() == pytest.approx(total.item())
    assert total.requires_grad and not any(v.requires_grad for v in parts.values())


def test_generator_loss_without_discriminator_has_no_adversarial_term():
    y = torch.rand(1, 1, 4, 4, 4)
    total, parts = generator_loss(y + 0.1, y, None, LossConfig(adv=100.0, rec=1.0, proj=0.0))
    assert "adv" not in parts
    assert total.item() == pytest.approx(0.01)


def test_volume_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="pred and target"):
        reconstruction_loss(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5))
    with pytest.raises(ValueError, match="pred and target"):
        projection_loss(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4))
