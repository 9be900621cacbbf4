"""Generators (CVAA-GAN and baselines) and the conditional 3D PatchGAN discriminator.

Every generator maps ``(B, 2, S, S)`` X-rays (channel 0 PA, channel 1 lateral) to a
``(B, 1, S, S, S)`` volume in (0, 1) and says whether it trains against the
discriminator (``uses_discriminator``)::

    cfg = load_config("cpu")
    G = build_generator("cvaa", cfg)      # or cfg.model.generator
    D = build_discriminator(cfg)
    fake = G(xrays)                       # (B, 1, 32, 32, 32)
    score = D(xrays, fake)                # (B, 1, 6, 6, 6) patch map
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .baselines import PSRGenerator, UNet3DGenerator, X2CTGenerator
from .blocks import ConcatConv, ConvNormAct, count_parameters
from .discriminator import PatchDiscriminator3D
from .encoder import Expand2Dto3D, Feat2D, expand_along
from .fusion import CVAAModule, FineDistillation, ViewAttentionAlignment
from .generator import CVAAGenerator

if TYPE_CHECKING:
    from cvaa.config import Config

# Registry: name -> generator class with ``from_config(cfg)`` (paper Table I's models).
GENERATORS: dict[str, type[nn.Module]] = {
    "cvaa": CVAAGenerator,
    "x2ct": X2CTGenerator,
    "3dcnn": UNet3DGenerator,
    "psr": PSRGenerator,
}


def build_generator(name: str, cfg: "Config") -> nn.Module:
    """Build the generator registered as ``name`` with sizes from ``cfg``.

    Example:
        >>> from cvaa.config import load_config
        >>> build_generator("cvaa", load_config("cpu")).uses_discriminator
        True
    """
    try:
        cls = GENERATORS[name]
    except KeyError:
        raise KeyError(f"unknown generator {name!r}; valid generators: {sorted(GENERATORS)}") from None
    return cls.from_config(cfg)


def set_output_prior(generator: nn.Module, mean: float) -> None:
    """Make an untrained generator's sigmoid output start at ``mean`` (in (0, 1)).

    Sets the bias of its last convolution (``generator.output_conv``) to ``logit(mean)``:
    with zero-mean features the first predictions are the data's mean intensity, not 0.5.

    Example:
        >>> from cvaa.config import load_config
        >>> g = build_generator("3dcnn", load_config("cpu"))
        >>> set_output_prior(g, 0.2)
        >>> round(torch.sigmoid(g.output_conv.bias).item(), 3)
        0.2
    """
    if not 0.0 < mean < 1.0:
        raise ValueError(f"mean must be in (0, 1), got {mean}")
    mean = min(max(mean, 1e-4), 1 - 1e-4)
    with torch.no_grad():
        generator.output_conv.bias.fill_(math.log(mean / (1.0 - mean)))


def build_discriminator(cfg: "Config") -> PatchDiscriminator3D:
    """The conditional 3D PatchGAN with sizes from ``cfg``."""
    return PatchDiscriminator3D.from_config(cfg)


__all__ = [
    "generator_from_state",
    "GENERATORS", "build_generator", "build_discriminator", "set_output_prior",
    "count_parameters",
    "CVAAGenerator", "X2CTGenerator", "UNet3DGenerator", "PSRGenerator",
    "PatchDiscriminator3D", "Feat2D", "Expand2Dto3D", "expand_along", "ConcatConv", "ConvNormAct",
    "ViewAttentionAlignment", "FineDistillation", "CVAAModule",
]


def generator_from_state(state: dict, cfg: "Config | None" = None) -> nn.Module:
    """The generator (eval mode) of a training checkpoint's state, built from ``cfg`` or
    from the config saved in the state (``state["config"]``, ``state["trainer"]``)."""
    from cvaa.config import Config

    cfg = cfg or Config.from_dict(state["config"])
    generator = build_generator(cfg.model.generator, cfg)
    generator.load_state_dict(state["trainer"]["generator"])
    return generator.eval()
