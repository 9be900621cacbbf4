"""Train-time X-ray domain randomisation: every sample's PA + lateral pair rendered again
from the case's context CT, with its own geometry, physics and display.

Real radiographs differ from one fixed DRR in every step of their making: the patient is
rotated and off-centre, the distances differ from room to room, the beam is polyenergetic
(bone against soft tissue changes with the effective energy) and scatters, the dose sets
the noise, the detector blurs, and the vendor's look-up table and edge enhancement
reshape the grey values. :func:`sample_params` draws one such setting per sample from
:class:`cvaa.config.AugmentConfig`; :func:`render_context` renders it:

1. attenuation from HU with a two-material split: ``mu = mu_water * s_mu * (1 + HU/1000)``
   up to ``bone_hu``, the excess above it scaled by ``s_bone`` (effective energy);
2. the patient rotated about the isocentre (trilinear resampling of ``mu``; air outside)
   and the isocentre shifted;
3. perspective line integrals (:func:`cvaa.data.drr.line_integrals`) with the source and
   detector distances and the detector pitch of the draw;
4. intensities ``I = exp(-L)`` plus scatter (the primary blurred by a wide Gaussian,
   ``scatter`` times as strong), Poisson noise at ``photons``, detector blur, back to
   ``L = -log(I / (1 + scatter))``, the fixed ``log_scale`` as the DRR's;
5. display: gamma, an optional sigmoid window (both monotonic), unsharp masking.

The target CT is untouched: the network must map whatever radiograph it gets to the CT in
its canonical frame. Every draw is a function of ``(augment.seed, epoch, case id)``
(:func:`sample_seed`), so a restarted worker renders the same samples.

Plain numpy/torch (no Ray): the training worker calls :class:`Randomizer` from its ingest
threads (:class:`cvaa.data.stream.CaseStream`), never in the GPU step.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from cvaa.config import AugmentConfig, Config, DRRConfig
from cvaa.data.drr import (Geometry, detector_pitch_mm, gaussian_blur, line_integrals,
                           projection_tables)

CONTEXT_DTYPE = np.int16


@dataclass(frozen=True)
class ContextCT:
    """The resampled CT a case's X-rays are rendered from, in the canonical axes
    ``(D, H, W)`` = (S->I, A->P, R->L).

    Attributes:
        hu: ``(D, H, W)`` HU (int16 on disk).
        spacing_mm: voxel size ``(x, y, z)`` = ``(W, H, D)``.
        isocenter_index: fractional index ``(d, h, w)`` of the crop centre (the DRR
            isocentre).
        fov_mm: the crop's field of view (the detector covers it at the isocentre).
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    isocenter_index: tuple[float, float, float]
    fov_mm: float


@dataclass(frozen=True)
class RenderParams:
    """One draw of the randomisation; the identity renders the fixed DRR.

    ``rotation_deg`` is about the physical (x: R->L, y: A->P, z: I->S) axes, applied in
    that order; ``shift_mm`` moves the isocentre, in the same axes.
    """

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sad_scale: float = 1.0
    sid_scale: float = 1.0
    zoom: float = 1.0
    mu_scale: float = 1.0
    bone_scale: float = 1.0
    scatter: float = 0.0
    photons: float = 0.0
    blur_px: float = 0.0
    gamma: float = 1.0
    window_center: float = 0.0   # 0: no sigmoid window
    window_width: float = 0.0
    unsharp_amount: float = 0.0
    unsharp_sigma_px: float = 2.0

    def is_identity(self) -> bool:
        return self == RenderParams()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- context CT

def context_of(prep, margin_mm: float) -> ContextCT:
    """The context CT of a :class:`cvaa.data.preprocess.PreparedCT`: its resampled CT over
    the crop's superior-inferior range widened by ``margin_mm`` on each side (clipped to
    the scan; beyond it is air), at the full axial extent, HU rounded to int16."""
    volume = prep.resampled
    spacing = tuple(float(v) for v in volume.spacing_mm)
    size = prep.cube.shape[0]
    margin = int(math.ceil(margin_mm / spacing[2]))
    d0 = max(0, prep.crop_start[0] - margin)
    d1 = min(volume.shape[0], prep.crop_start[0] + size + margin)
    d1 = max(d1, d0 + 1)
    hu = np.clip(np.rint(volume.array[d0:d1]), -32768, 32767).astype(CONTEXT_DTYPE)
    iso = np.asarray(prep.crop_start, float) + (size - 1) / 2
    iso[0] -= d0
    return ContextCT(hu, spacing, tuple(float(v) for v in iso),
                     float(size * prep.cube.spacing_mm[0]))


def encode_context(context: ContextCT) -> bytes:
    buf = io.BytesIO()
    meta = {"spacing_mm": list(context.spacing_mm),
            "isocenter_index": list(context.isocenter_index), "fov_mm": context.fov_mm}
    np.savez_compressed(buf, hu=context.hu.astype(CONTEXT_DTYPE),
                        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return buf.getvalue()


def decode_context(data: bytes) -> ContextCT:
    with np.load(io.BytesIO(data)) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        return ContextCT(z["hu"], tuple(meta["spacing_mm"]), tuple(meta["isocenter_index"]),
                         float(meta["fov_mm"]))


def sample_seed(seed: int, epoch: int, case_id: str) -> int:
    """A 64-bit seed of ``(seed, epoch, case id)``, the same in every process."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def sample_params(cfg: AugmentConfig, rng: np.random.Generator) -> RenderParams:
    """One draw from the ranges of ``cfg`` (``clean_fraction`` of them the identity)."""
    if rng.random() < cfg.clean_fraction:
        return RenderParams()

    def sym(limit: float, n: int | None = None):
        return rng.uniform(-limit, limit, n) if limit > 0 else (np.zeros(n) if n else 0.0)

    rotation = tuple(float(v) for v in sym(cfg.rotation_deg, 3))
    shift = tuple(float(v) for v in sym(cfg.shift_mm, 3))
    photons = 0.0
    if cfg.photons_max > 0:
        photons = float(math.exp(rng.uniform(math.log(cfg.photons_min),
                                              math.log(cfg.photons_max))))
    window = rng.random() < cfg.window_prob
    log_gamma = math.log1p(cfg.gamma_frac)
    return RenderParams(
        rotation_deg=rotation, shift_mm=shift,
        sad_scale=1.0 + float(sym(cfg.distance_frac)),
        sid_scale=1.0 + float(sym(cfg.distance_frac)),
        zoom=1.0 + float(sym(cfg.zoom_frac)),
        mu_scale=1.0 + float(sym(cfg.mu_frac)),
        bone_scale=1.0 + float(sym(cfg.bone_frac)),
        scatter=float(rng.uniform(0.0, cfg.scatter_max)) if cfg.scatter_max > 0 else 0.0,
        photons=photons,
        blur_px=float(rng.uniform(0.0, cfg.blur_max_px)) if cfg.blur_max_px > 0 else 0.0,
        gamma=float(math.exp(rng.uniform(-log_gamma, log_gamma))),
        window_center=float(rng.uniform(0.3, 0.7)) if window else 0.0,
        window_width=float(rng.uniform(0.1, 0.3)) if window else 0.0,
        unsharp_amount=float(rng.uniform(0.0, cfg.unsharp_max)) if cfg.unsharp_max > 0
        else 0.0,
        unsharp_sigma_px=float(rng.uniform(1.0, 4.0)))


# --------------------------------------------------------------------------- rendering

def attenuation(hu: torch.Tensor, mu_water_per_mm: float, mu_scale: float = 1.0,
                bone_scale: float = 1.0, bone_hu: float = 200.0) -> torch.Tensor:
    """Two-material attenuation (1/mm) from HU, at least 0: water-like up to ``bone_hu``,
    the excess above it scaled by ``bone_scale``; everything by ``mu_scale``. With both
    scales 1 it is :func:`cvaa.data.drr.hu_to_mu`."""
    hu = hu.float()
    if bone_scale != 1.0:
        hu = torch.where(hu > bone_hu, bone_hu + (hu - bone_hu) * bone_scale, hu)
    water = mu_water_per_mm * mu_scale
    return hu.mul(water / 1000.0).add_(water).clamp_(min=0.0)


def rotation_matrix(degrees: tuple[float, float, float]) -> np.ndarray:
    """``Rz @ Ry @ Rx`` of angles about the physical x, y, z axes."""
    ax, ay, az = (math.radians(float(d)) for d in degrees)
    cx, sx, cy, sy, cz, sz = (math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay),
                              math.cos(az), math.sin(az))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotation_theta(degrees: tuple[float, float, float], spacing_mm: tuple[float, float, float],
                   center_index: tuple[float, float, float],
                   shape_dhw: tuple[int, int, int]) -> torch.Tensor:
    """The ``(1, 3, 4)`` float32 affine of ``F.affine_grid`` (normalised coordinates,
    align_corners) that turns a ``(D, H, W)`` volume by ``degrees`` about the physical
    point at ``center_index``; host arithmetic, a CPU tensor (:func:`rotate_with` applies
    it on any device)."""
    n_d, n_h, n_w = shape_dhw
    sx, sy, sz = spacing_mm
    # index (w, h, d) -> physical (x, y, z) about the centre: x = w*sx, y = h*sy, z = -d*sz
    to_mm = np.diag([sx, sy, -sz])
    rot = rotation_matrix(degrees)
    # Output voxel p takes the input at R^T p (the patient turned by R).
    a = np.linalg.inv(to_mm) @ rot.T @ to_mm                    # index offsets -> index
    c = np.array([center_index[2], center_index[1], center_index[0]], float)  # (w, h, d)
    sizes = np.array([n_w, n_h, n_d], float)
    # normalised grid coordinates (align_corners=True): n = 2 i / (size - 1) - 1
    scale = 2.0 / np.maximum(sizes - 1, 1)
    theta_lin = np.diag(scale) @ a @ np.diag(1 / scale)
    offset = scale * (c - a @ c) + (theta_lin @ np.ones(3)) - np.ones(3)
    theta = np.concatenate([theta_lin, offset[:, None]], axis=1)
    return torch.as_tensor(theta, dtype=torch.float32)[None]


def rotate_about(mu: torch.Tensor, degrees: tuple[float, float, float],
                 spacing_mm: tuple[float, float, float],
                 center_index: tuple[float, float, float]) -> torch.Tensor:
    """``(1, 1, D, H, W)`` attenuation of the patient rotated by ``degrees`` about the
    physical point at ``center_index``; what comes from outside the volume is air."""
    theta = rotation_theta(degrees, spacing_mm, center_index, tuple(mu.shape[2:]))
    return rotate_with(mu, theta.to(mu.device))


def rotate_with(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``(1, 1, D, H, W)`` resampled by the ``(1, 3, 4)`` affine ``theta`` of
    :func:`rotation_theta`, already on ``mu``'s device (trilinear; air outside)."""
    grid = F.affine_grid(theta, [1, 1, *mu.shape[2:]], align_corners=True)
    return F.grid_sample(mu, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=True)


def _display(image: torch.Tensor, p: RenderParams) -> torch.Tensor:
    """Monotonic look-up table (gamma, sigmoid window), then unsharp masking."""
    if p.gamma != 1.0:
        image = image.clamp(min=0.0).pow(p.gamma)
    if p.window_width > 0:
        # The window's ends in host arithmetic (no tensor made from a host value).
        lo, hi = (1.0 / (1.0 + math.exp(-(v - p.window_center) / p.window_width))
                  for v in (0.0, 1.0))
        image = (torch.sigmoid((image - p.window_center) / p.window_width) - lo) / (hi - lo)
    if p.unsharp_amount > 0:
        image = image + p.unsharp_amount * (image - gaussian_blur(image,
                                                                  p.unsharp_sigma_px))
    return image.clamp(0.0, 1.0)


def render_context(context: ContextCT, drr: DRRConfig, params: RenderParams, *,
                   bone_hu: float = 200.0,
                   generator: torch.Generator | None = None) -> np.ndarray:
    """PA + lateral ``(2, P, P)`` float32 in [0, 1] of ``context`` under ``params``, on the
    CPU (:func:`render_hu` on the context's HU).

    With the identity it is the fixed DRR of the case (``drr.source == "full"``), up to
    the context's int16 rounding of HU.
    """
    hu = torch.from_numpy(np.ascontiguousarray(context.hu))
    image = render_hu(hu, context, drr, params, bone_hu=bone_hu, generator=generator)
    return image.numpy().astype(np.float32, copy=False)


@dataclass(frozen=True)
class RenderPlan:
    """What the host computes for one randomised render of a context CT: the draw, the
    rotation's affine and both views' projection tables. Built in an ingest thread
    (:func:`plan_render`), moved to the device with :meth:`to` (asynchronous from pinned
    memory), rendered there by :func:`render_planned` without another host value.

    Attributes:
        params: the draw.
        geometry: the draw's source/detector geometry.
        theta: ``(1, 3, 4)`` rotation affine (:func:`rotation_theta`), or ``None``.
        tables: PA and lateral tables of :func:`cvaa.data.drr.projection_tables`.
        bone_hu: the two-material split of :func:`attenuation`.
    """

    params: RenderParams
    geometry: Geometry
    theta: torch.Tensor | None
    tables: tuple
    bone_hu: float

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RenderPlan":
        theta = None if self.theta is None else self.theta.to(device, non_blocking=non_blocking)
        return replace(self, theta=theta,
                       tables=tuple(t.to(device, non_blocking) for t in self.tables))

    def pin_memory(self) -> "RenderPlan":
        theta = None if self.theta is None else self.theta.pin_memory()
        return replace(self, theta=theta, tables=tuple(t.pin_memory() for t in self.tables))


def plan_render(context: ContextCT, drr: DRRConfig, params: RenderParams, *,
                bone_hu: float = 200.0) -> RenderPlan:
    """The host part of rendering ``context`` under ``params`` (see :class:`RenderPlan`);
    its tensors are on the CPU."""
    shape = tuple(int(n) for n in context.hu.shape)                      # (D, H, W)
    iso = np.asarray(context.isocenter_index, float)                     # (d, h, w)
    theta = None
    if any(params.rotation_deg):
        theta = rotation_theta(params.rotation_deg, context.spacing_mm, tuple(iso), shape)
    if any(params.shift_mm):
        sx, sy, sz = context.spacing_mm
        dx, dy, dz = params.shift_mm
        iso = iso + np.array([-dz / sz, dy / sy, dx / sx])               # z grows superior
    pitch = drr.pixel_pitch_mm or detector_pitch_mm(context.fov_mm, drr.sad_mm, drr.sid_mm,
                                                    drr.detector_pixels)
    sad = drr.sad_mm * params.sad_scale
    sid = max(drr.sid_mm * params.sid_scale, sad * 1.05)
    geometry = Geometry(sad, sid, drr.detector_pixels, pitch * params.zoom, drr.step_mm)
    tables = projection_tables(geometry, shape, context.spacing_mm,
                               tuple(float(v) for v in iso), "cpu")
    return RenderPlan(params, geometry, theta, tables, bone_hu)


def render_hu(hu: torch.Tensor, context: ContextCT, drr: DRRConfig, params: RenderParams,
              *, bone_hu: float = 200.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """PA + lateral ``(2, P, P)`` float32 in [0, 1] on ``hu``'s device.

    Args:
        hu: ``(D, H, W)`` HU of ``context`` (any dtype, e.g. its int16), on the device to
            render on; ``context`` gives its spacing, isocentre and field of view.
        generator: the Poisson noise's generator, on ``hu``'s device (default: seeded
            with ``drr.seed``).
    """
    plan = plan_render(context, drr, params, bone_hu=bone_hu).to(hu.device)
    return render_planned(hu, plan, drr, generator=generator)


def render_planned(hu: torch.Tensor, plan: RenderPlan, drr: DRRConfig, *,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`render_hu` from a :class:`RenderPlan` already on ``hu``'s device: device
    work only (no tensor is made from a host value, so nothing waits for the stream).

    Args:
        hu: ``(D, H, W)`` HU on the device.
        plan: :func:`plan_render` of the same context, moved with :meth:`RenderPlan.to`.
        drr: the detector and physics (``photons`` of the fixed DRR, ``log_scale``).
        generator: the Poisson noise's generator, on ``hu``'s device.
    """
    params = plan.params
    mu = attenuation(hu[None, None], drr.mu_water_per_mm, params.mu_scale,
                     params.bone_scale, plan.bone_hu)                     # (1, 1, D, H, W)
    if plan.theta is not None:
        mu = rotate_with(mu, plan.theta)
    line = line_integrals(mu, plan.geometry, None, tables=plan.tables)
    identity = params.is_identity()  # the fixed DRR's own noise and blur, if it has any
    noise = drr.photons if identity else params.photons
    blur = drr.blur_sigma_px if identity else params.blur_px
    if params.scatter > 0 or noise > 0 or (blur > 0 and not identity):
        if noise > 0 and generator is None:
            generator = torch.Generator(device=line.device).manual_seed(drr.seed)
        line = detector_response(line, params.scatter, noise, blur, generator)
    image = torch.clamp(line / drr.log_scale, 0.0, 1.0)
    image = _display(image, params)
    return image[0]


def detector_response(line: torch.Tensor, scatter: float, photons: float, blur_px: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Line integrals ``(..., P, P)`` -> the line integrals the detector reports:
    ``I = exp(-L)`` plus scatter (the primary blurred by a wide Gaussian of ``P / 8`` px,
    ``scatter`` times as strong), Poisson noise at ``photons`` (0: none), blur of
    ``blur_px``, back to ``-log(I / (1 + scatter))``."""
    intensity = torch.exp(-line)
    if scatter > 0:
        wide = max(1.0, line.shape[-1] / 8.0)
        intensity = (intensity + scatter * gaussian_blur(intensity, wide)) / (1.0 + scatter)
    floor = 1e-6
    if photons > 0:
        intensity = torch.poisson(photons * intensity, generator=generator) / photons
        floor = 0.5 / photons
    intensity = gaussian_blur(intensity, blur_px)
    return -torch.log(intensity.clamp(min=floor))


def perturb_xrays(xrays: torch.Tensor, params: RenderParams, log_scale: float,
                  fov_mm: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """One randomisation draw applied to a radiograph pair in image space.

    The train-time randomisation (:func:`render_context`) renders the
    context CT again; a radiograph has none, so the same draw acts on the images: the
    in-plane part of the geometry (magnification by the distances and the pitch, the
    isocentre shift, the rotation about each beam's axis), the effective energy as a
    scale of the line integral (bone contrast needs the CT and is left out), then scatter,
    dose, blur and the display exactly as there. The identity returns the input.

    Args:
        xrays: ``(2, P, P)`` in [0, 1], rows superior -> inferior.
        params: the draw.
        log_scale: ``cfg.drr.log_scale`` (image = line integral / log_scale).
        fov_mm: the field of view the detector covers at the isocentre.
        generator: seeds the Poisson noise.

    Returns:
        ``(2, P, P)`` float32 in [0, 1].
    """
    if xrays.dim() != 3 or xrays.shape[0] != 2:
        raise ValueError(f"xrays must be (2, P, P), got {tuple(xrays.shape)}")
    if params.is_identity():
        return xrays.float().clone()
    x = xrays.float()
    p = x.shape[-1]
    # The object's size on the detector scales with SID / SAD and inversely with pitch.
    scale = (params.sid_scale / params.sad_scale) / params.zoom
    dx, dy, dz = (2.0 * s / fov_mm for s in params.shift_mm)   # mm -> normalised units
    thetas = []
    # PA: columns along x (R->L), turned about y; lateral: columns along y (A->P), turned
    # about x; rows run along -z in both. affine_grid maps output to input coordinates,
    # so content moved by +d takes the offset -d.
    for angle, col, row in ((params.rotation_deg[1], dx, dz),
                            (params.rotation_deg[0], dy, dz)):
        a = math.radians(angle)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / scale
        thetas.append(np.concatenate([rot, np.array([[-col], [row]])], axis=1))
    theta = torch.as_tensor(np.stack(thetas), dtype=torch.float32)       # (2, 2, 3)
    grid = F.affine_grid(theta, [2, 1, p, p], align_corners=False)
    moved = F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)[:, 0][None]                # (1, 2, P, P)
    line = moved * log_scale * params.mu_scale
    if params.scatter > 0 or params.photons > 0 or params.blur_px > 0:
        line = detector_response(line, params.scatter, params.photons, params.blur_px,
                                 generator)
    image = _display(torch.clamp(line / log_scale, 0.0, 1.0), params)
    return image[0].float()


def renders_on_device(device: torch.device) -> bool:
    """Whether a worker on ``device`` renders its randomised X-rays there, in the step's
    batch (CUDA: ~1.7 ms a pair on an H200 against ~300 ms on a CPU thread), rather than
    in the ingest threads (every other device: today's path, unchanged)."""
    return device.type == "cuda"


@dataclass(frozen=True)
class Draw:
    """One sample's randomisation, drawn, read and planned in the ingest threads, to be
    rendered on the device (:meth:`Randomizer.render_batch`).

    Attributes:
        seed: :func:`sample_seed` of the sample; seeds its Poisson noise.
        hu: ``(D, H, W)`` int16 HU of the case's context CT as a tensor.
        plan: the host part of the render (:func:`plan_render`): the draw's parameters,
            geometry, rotation and projection tables (never the identity: those keep the
            fixed DRR). ``hu`` and ``plan`` are pinned for a CUDA worker, so their copies
            to the device are asynchronous.
    """

    seed: int
    hu: torch.Tensor
    plan: RenderPlan

    @property
    def params(self) -> RenderParams:
        return self.plan.params


class Randomizer:
    """``case_id -> (xrays, ct)`` with freshly randomised X-rays: the training stream's
    ``load`` when ``augment.enabled``.

    Args:
        load_case: ``case_id -> (xrays (2, P, P), ct (1, D, H, W))``, the fixed pair.
        load_context: ``case_id -> ContextCT``.
        cfg: the run's config (``augment``, ``drr``).

        device: the training step's device. On CUDA (:func:`renders_on_device`) the
            stream's ``load`` is :meth:`sample` (the threads read the CT, draw the
            parameters, read the context and build the render's tables) and the step
            renders the batch with :meth:`render_batch`; elsewhere it is the instance
            itself, which renders in the threads. :meth:`loader` picks.
        render_in_step: force the choice (``True``: the CUDA path on any device, for
            ``train.cuda_shaped``); ``None``: :func:`renders_on_device`.

    Set :attr:`epoch` before each epoch (the stream is drained between epochs); the draw
    of a sample is a function of ``(augment.seed, epoch, case id)`` on either path, and so
    is its noise (a generator seeded with :func:`sample_seed` on the rendering device:
    the same draws on a CPU; a CUDA generator's own sequence on a GPU).
    """

    def __init__(self, load_case: Callable[[str], tuple[np.ndarray, np.ndarray]],
                 load_context: Callable[[str], ContextCT], cfg: Config,
                 device: torch.device | None = None, render_in_step: bool | None = None):
        self.load_case, self.load_context, self.cfg = load_case, load_context, cfg
        self.device = device or torch.device("cpu")
        self.render_in_step = (renders_on_device(self.device) if render_in_step is None
                               else render_in_step)
        self.epoch = 0
        self._lock = threading.Lock()
        self._seconds, self._rendered = 0.0, 0

    def take_ms_per_sample(self) -> float:
        """Mean milliseconds per randomised sample (context read + render) since the last
        call; 0 if none."""
        with self._lock:
            seconds, n = self._seconds, self._rendered
            self._seconds, self._rendered = 0.0, 0
        return 1000.0 * seconds / n if n else 0.0

    def params(self, case_id: str) -> tuple[RenderParams, int]:
        seed = sample_seed(self.cfg.augment.seed, self.epoch, case_id)
        return sample_params(self.cfg.augment, np.random.default_rng(seed)), seed

    def __call__(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        xrays, ct = self.load_case(case_id)
        params, seed = self.params(case_id)
        if params.is_identity():
            return xrays, ct
        tick = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        drr = replace(self.cfg.drr, photons=0.0)
        xrays = render_context(self.load_context(case_id), drr, params,
                               bone_hu=self.cfg.augment.bone_hu, generator=generator)
        with self._lock:
            self._seconds += time.perf_counter() - tick
            self._rendered += 1
        return xrays, ct

    def loader(self) -> Callable[[str], tuple]:
        """The training stream's ``load``: :meth:`sample` when the device renders,
        else this instance (renders in the ingest threads)."""
        return self.sample if self.render_in_step else self

    def sample(self, case_id: str) -> tuple[np.ndarray, np.ndarray, Draw | None]:
        """``(fixed xrays (2, P, P), ct (1, D, H, W), draw)``: the draw, the context read
        (the slow part of the I/O) and the render's host work (rotation affine, projection
        tables) happen here, in an ingest thread; ``None`` for a sample that keeps the
        fixed DRR."""
        xrays, ct = self.load_case(case_id)
        params, seed = self.params(case_id)
        if params.is_identity():
            return xrays, ct, None
        tick = time.perf_counter()
        context = self.load_context(case_id)
        hu = torch.from_numpy(np.ascontiguousarray(context.hu))
        plan = plan_render(context, replace(self.cfg.drr, photons=0.0), params,
                           bone_hu=self.cfg.augment.bone_hu)
        if self.device.type == "cuda":
            hu, plan = hu.pin_memory(), plan.pin_memory()
        with self._lock:   # the read and the tables: the render is part of the step's time
            self._seconds += time.perf_counter() - tick
            self._rendered += 1
        return xrays, ct, Draw(seed, hu, plan)

    def render_batch(self, xrays: torch.Tensor, draws: tuple[Draw | None, ...]
                     ) -> torch.Tensor:
        """The batch's X-rays with each drawn sample rendered again on ``xrays``' device.

        Args:
            xrays: ``(B, 2, P, P)`` fixed DRRs, on the device.
            draws: one per sample (:meth:`sample`); ``None`` keeps the row.

        Returns:
            ``(B, 2, P, P)`` float32 on the device; equal (on a CPU) to what the threads'
            path renders for the same draws. Nothing is read back to the host and no tensor
            is made from a host value: the draws' pinned tensors are copied asynchronously.
        """
        if len(draws) != xrays.shape[0]:
            raise ValueError(f"{len(draws)} draws for a batch of {xrays.shape[0]}")
        if not any(draws):
            return xrays
        drr = replace(self.cfg.drr, photons=0.0)
        device = xrays.device
        rows = []
        for row, draw in zip(xrays, draws):
            if draw is None:
                rows.append(row)
                continue
            generator = torch.Generator(device=device).manual_seed(draw.seed)
            hu = draw.hu.to(device, non_blocking=True)
            plan = draw.plan.to(device, non_blocking=True)
            rows.append(render_planned(hu, plan, drr, generator=generator))
        return torch.stack(rows)
