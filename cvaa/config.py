"""One source of defaults: frozen dataclasses for every part of cvaa.

YAML files and ``--set a.b=v`` overrides only change existing fields; an unknown key is an
error that names it. The resolved config serialises to a plain dict (for MLflow and for
every checkpoint) and back unchanged::

    cfg = load_config(preset="cpu", overrides=["drr.sad_mm=900", "optim.lr_g=1e-4"])
    assert Config.from_dict(cfg.to_dict()) == cfg

The defaults are the paper's setting (arXiv 2408.09736, section III): 2 mm isotropic CT
centre-cropped to 128^3, clipped to [-1000, 4096] HU, min-max normalised; 128^2 X-rays.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (names the key)."""


@dataclass(frozen=True)
class DataConfig:
    """Where cases come from and how they are split.

    Args:
        n_phantoms: number of synthetic lumbar phantoms the embedded default generates.
        phantom_implant_fraction: fraction of phantoms that carry pedicle screws and rods.
        test_fraction: fraction of *patients* held out for the test split.
        seed: seeds the split and the phantom generator.
    """

    n_phantoms: int = 64
    phantom_implant_fraction: float = 0.3
    test_fraction: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class PreprocessConfig:
    """CT preprocessing (paper section III.A).

    Args:
        spacing_mm: isotropic voxel spacing after resampling.
        size: edge of the cube crop, in voxels (field of view = size * spacing_mm).
        crop_center: ``volume`` centres the crop on the volume centre; ``body`` on the
            centroid of the body found by thresholding (table and air ignored).
        body_threshold_hu: voxels above this are candidate body tissue for ``body``.
        clip_hu: HU window kept; also the min-max normalisation range.
        pad_hu: value used where the crop reaches outside the scanned volume (air).
        context_margin_mm: the prepared dataset also keeps, per case, the resampled CT
            (HU, int16) over the crop's superior-inferior range widened by this margin on
            each side, at the full axial extent, so that X-rays can be rendered again
            with other geometry and physics (``augment``); ``0`` keeps no context (no
            X-ray randomisation possible). The margin covers the rays' divergence and the
            augmentation's rotations and shifts.
    """

    spacing_mm: float = 2.0
    size: int = 128
    crop_center: Literal["volume", "body"] = "volume"
    body_threshold_hu: float = -500.0
    clip_hu: tuple[float, float] = (-1000.0, 4096.0)
    pad_hu: float = -1000.0
    context_margin_mm: float = 64.0


@dataclass(frozen=True)
class DicomConfig:
    """Which series of a DICOM export become cases (see ``cvaa.data.dicom_index`` and
    docs/guide/dicom.md). A series qualifies when it is CT, not a localizer, secondary
    capture or projection, has ``min_slices`` or more slices of one size and one
    orientation, and evenly spaced slice positions without gaps; of a study's qualifying
    series one is chosen by these preferences, in this order.

    Args:
        keep: ``one`` series per study (the best by the preferences) or ``all`` qualifying
            series, each its own case (cases of one patient stay on one side of the split).
        orientation: ``axial`` qualifies axial series only (slice normal within ~25 degrees
            of the body axis); ``any`` also coronal and sagittal reformats.
        min_slices: fewer slices than this do not qualify (a 16-voxel axis is the least
            ``read_ct`` accepts).
        max_slice_spacing_mm: series with slices at most this far apart are preferred;
            ``0`` means the preprocessing grid's ``preprocess.spacing_mm``.
        prefer_kernel: ``soft`` tissue over sharp (bone, lung) reconstruction kernels,
            ``sharp`` the other way round, or ``any``.
        sharp_kernel_pattern: regular expression (case-insensitive, searched in
            ConvolutionKernel) that marks a kernel as sharp; the default covers Siemens
            B/Br/I/Hr >= 50, GE BONE/LUNG/EDGE/DETAIL, Philips D/E/L/Y*, Canon FC30+ and
            FC5x-FC8x.
        prefer_contrast: ``without`` (non-contrast first, where ContrastBolusAgent is
            tagged), ``with``, or ``any``.
    """

    keep: Literal["one", "all"] = "one"
    orientation: Literal["axial", "any"] = "axial"
    min_slices: int = 16
    max_slice_spacing_mm: float = 0.0
    prefer_kernel: Literal["soft", "sharp", "any"] = "soft"
    sharp_kernel_pattern: str = (r"bone|lung|edge|detail|sharp|^(b|br|i|ir|hr|q|qr)[5-9]\d"
                                 r"|^(d|e|l|y[a-z]?)$|^fc(3\d|[5-8]\d)")
    prefer_contrast: Literal["without", "with", "any"] = "without"


@dataclass(frozen=True)
class DRRConfig:
    """Biplanar DRR geometry and physics (see ``cvaa.data.drr``).

    Args:
        mu_water_per_mm: linear attenuation of water; mu = mu_water * (1 + HU / 1000).
        sad_mm: source-to-isocentre distance.
        sid_mm: source-to-detector distance.
        detector_pixels: detector edge in pixels (square detector).
        pixel_pitch_mm: detector pixel pitch; ``0`` derives it so the detector covers the
            crop's field of view at the isocentre (fov * sid / sad / pixels).
        step_mm: distance between sampling planes along each view's main axis; ``0``
            puts one plane through every voxel centre (Joseph's method: exact for the
            trilinear volume up to the ray obliquity, and 3x faster than 1 mm at 2 mm).
        log_scale: fixed divisor of the line integral, mapping it to [0, 1] (never the
            per-image maximum, which would destroy dose information). 12 = 600 mm of
            water; beyond it e^-12 leaves < 1 photon of 10^5, so a real detector sees
            nothing. The real lumbar CT (364 mm wide) peaks at 0.46 PA and 0.70 lateral.
        source: ``full`` renders from the whole resampled CT, ``cube`` from the crop only.
        photons: I0 for Beer-Lambert with Poisson noise; ``0`` renders noise-free.
        blur_sigma_px: detector blur (Gaussian sigma in pixels) applied with noise.
        seed: seeds the noise.
    """

    mu_water_per_mm: float = 0.02
    sad_mm: float = 1000.0
    sid_mm: float = 1500.0
    detector_pixels: int = 128
    pixel_pitch_mm: float = 0.0
    step_mm: float = 0.0
    log_scale: float = 12.0
    source: Literal["full", "cube"] = "full"
    photons: float = 0.0
    blur_sigma_px: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time X-ray domain randomisation (see ``cvaa.data.augment``): each training
    sample's PA + lateral pair is rendered again from the case's context CT, with its
    own geometry, physics and display drawn from these ranges; the target CT stays in the
    canonical frame. Off by default (the paper's fixed DRRs); validation and Table I
    always use the fixed DRRs.

    Args:
        enabled: randomise the training X-rays.
        seed: with the epoch and the case id, seeds every sample's draw.
        clean_fraction: share of samples given the fixed DRR unchanged.
        rotation_deg: patient rotation about each physical axis, uniform in +-this.
        shift_mm: isocentre shift along each axis, uniform in +-this.
        distance_frac: source-isocentre and source-detector distances each scaled by
            ``1 + u``, ``u`` uniform in +-this (the detector's pixel pitch is kept).
        zoom_frac: detector pixel pitch scaled by ``1 + u`` (crop / zoom).
        mu_frac: effective energy: water attenuation scaled by ``1 + u``.
        bone_frac: bone-vs-soft-tissue contrast: attenuation above ``bone_hu`` scaled by
            a further ``1 + u``.
        bone_hu: HU above which a voxel is bone in the two-material split.
        scatter_max: scatter-to-primary ratio, uniform in [0, this]; scatter is the
            primary image blurred by a wide Gaussian (an eighth of the detector).
        photons_min, photons_max: dose, log-uniform photons per pixel (Poisson noise);
            ``photons_max == 0``: noise-free.
        blur_max_px: detector blur sigma, uniform in [0, this] pixels.
        gamma_frac: display look-up table: gamma ``exp(u)``, ``u`` uniform in
            +-``log(1 + gamma_frac)``.
        window_prob: probability of a sigmoid window (centre 0.3-0.7, width 0.1-0.3)
            after the gamma.
        unsharp_max: unsharp-masking amount, uniform in [0, this] (sigma 1-4 pixels).
    """

    enabled: bool = False
    seed: int = 0
    clean_fraction: float = 0.2
    rotation_deg: float = 5.0
    shift_mm: float = 10.0
    distance_frac: float = 0.1
    zoom_frac: float = 0.05
    mu_frac: float = 0.1
    bone_frac: float = 0.25
    bone_hu: float = 200.0
    scatter_max: float = 0.3
    photons_min: float = 2e4
    photons_max: float = 1e6
    blur_max_px: float = 1.0
    gamma_frac: float = 0.3
    window_prob: float = 0.3
    unsharp_max: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Generator and discriminator sizes (see ``cvaa.models``).

    The encoder has one stage per entry of ``dense_layers``; with ``n`` stages an ``S^2``
    X-ray gives feature maps at ``S, S/2, ..., S/2^n`` (stem + one per stage), and the
    decoder has one level per scale, deepest first, so ``decoder_channels`` has ``n + 1``
    entries. The paper preset follows X2CT-GAN: 128^2 -> 4^2 in five stages, decoder
    256@4^3 ... 16@128^3. ``cvaa`` and ``x2ct`` share these fields; with the defaults
    ``x2ct`` is X2CT-GAN's released generator (61,715,633 parameters,
    ``docs/x2ct_mapping.md``), at the ``cpu`` preset (three stages, 32^2 -> 4^2) 0.24 M.

    Args:
        generator: registry name: ``cvaa``, ``x2ct``, ``3dcnn`` or ``psr``.
        stem_channels: channels of the encoder stem (X2CT-GAN: 64).
        growth: DenseNet growth rate (X2CT-GAN: 32).
        dense_layers: DenseNet layers per encoder stage, one entry per stage. ``x2ct``
            needs a deepest scale ``S / 2^n`` of at least 2 (its last stage instance-
            normalises that map before pooling it).
        encoder_channels: channels after each encoder stage's transition. ``x2ct`` uses
            all but the last (its last stage is pooled, with no transition); the defaults
            are X2CT-GAN's halving widths, so the paper preset is its generator.
        decoder_channels: decoder channels at each scale, deepest first (stages + 1); for
            ``x2ct`` also the skip linkers' widths and, first entry, the FC volume's.
        unet_channels: 3D U-Net widths of the ``3dcnn`` baseline, full resolution first.
        psr_channels: 2D U-Net widths of the ``psr`` baseline, full resolution first.
        disc_channels: PatchGAN widths (k4 convs), the last conv maps to 1.
        disc_expand_channels: channels of each X-ray's 2D->3D expansion inside D.
        checkpoint: recompute decoder activations in the backward pass (activation
            checkpointing): about a third more compute for a much lower memory peak
            (``cvaa``: per CVAA module; ``x2ct``: per decoder level).
        output_prior: start training with the generator's sigmoid output at the training
            CTs' mean intensity (output bias = its logit) instead of 0.5, for every model.
            A 1x1 output conv (the U-Net baselines) otherwise needs ~1k Adam steps only to
            move its bias there.
        cpu_conv: on a CPU, CVAA's 7^3 attention convs (and X2CT-GAN's 7^3 output conv):
            ``fft`` (about 2x faster, about 2x the memory), ``direct`` (least memory) or
            ``auto`` (FFT unless its estimated spectra exceed half the available memory).
            GPUs always use cuDNN.
    """

    generator: Literal["cvaa", "x2ct", "3dcnn", "psr"] = "cvaa"
    stem_channels: int = 64
    growth: int = 32
    dense_layers: tuple[int, ...] = (6, 12, 24, 16, 6)
    encoder_channels: tuple[int, ...] = (128, 256, 512, 512, 512)
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16, 16)
    unet_channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    psr_channels: tuple[int, ...] = (64, 128, 256, 512, 512)
    disc_channels: tuple[int, ...] = (64, 128, 256, 512)
    disc_expand_channels: int = 8
    checkpoint: bool = False
    output_prior: bool = True
    cpu_conv: Literal["auto", "fft", "direct"] = "auto"


@dataclass(frozen=True)
class LossConfig:
    """Loss weights of the generator (paper section II.B; X2CT-GAN's values).

    Args:
        adv: LSGAN adversarial term (eq. 1); unused by generators trained without D.
        rec: voxel-wise MSE reconstruction term.
        proj: L1 between mean projections along the three axes.
    """

    adv: float = 0.1
    rec: float = 10.0
    proj: float = 10.0


@dataclass(frozen=True)
class OptimConfig:
    """Adam for G and D (paper section III.B: 2e-4, beta 0.5 / 0.99).

    Args:
        lr_g, lr_d: learning rates at the ``reference_batch`` (the paper's: batch 4).
        lr_scaling: how the learning rates follow a global batch other than
            ``reference_batch``: ``none``, ``linear`` (lr x batch / reference) or ``sqrt``
            (lr x sqrt(batch / reference)); see :func:`cvaa.gan.scaled_lr`.
        reference_batch: the global batch the learning rates were chosen for.
    """

    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.99
    constant_epochs: int = 100
    decay_epochs: int = 100
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_batch: int = 4


@dataclass(frozen=True)
class TrainConfig:
    """Training loop settings (paper section III.B: 200 epochs, batch 4, alternating G/D).

    Args:
        epochs: total epochs (``optim`` decides where the LR decay starts).
        batch_size: the global batch, split evenly over ``num_workers`` (it must divide);
            each DDP rank steps on ``batch_size // num_workers`` cases.
        seed: seeds initialisation, shuffling and the validation split.
        val_fraction: fraction of the training *patients* held out for per-epoch
            validation (at least one case); the test split is kept for the final table.
        calibration_cases: number of *cases* held out of the train split, by patient,
            for the reliability calibration (``cvaa.reliability``): whole patients, in an
            order seeded by ``seed``, until the hold-out has at least this many cases
            (:func:`cvaa.data.dataset.training_split`). They are never trained or validated
            on; at the end of ``jobs/train.py`` the registered version is calibrated on them
            when they are at least ``cvaa.reliability.minimum_cases()`` (30 at level 0.9),
            else it stays ``uncalibrated`` and the job says why. The hold-out never takes
            more than half the train split: with fewer than ``2 * calibration_cases``
            train-split cases nothing is held out. ``0``: no hold-out (calibrate later with
            ``jobs/calibrate.py``).
        calibration_k: forward samples per case of that calibration (the ``K`` of
            ``jobs/calibrate.py --k``; reconstructions with reliability then use it too).
        figure_every: log a slice figure (and the checkpoint as an MLflow artifact) every K
            epochs, and at the last.
        num_workers: Ray Train workers (DDP ranks).
        use_gpu: give each worker ``gpus_per_worker`` GPUs.
        gpus_per_worker: GPUs reserved per worker when ``use_gpu`` (a fraction lets
            several Tune trials share one GPU; above 1 it must be a whole number).
        accelerator_type: Ray accelerator label the workers must run on (e.g. ``A40``).
        cpus_per_worker: CPUs reserved per worker (leave some for Ray Data on small nodes).
        placement_strategy: how Ray places the workers' bundles: ``PACK`` (default: fill
            a node's GPUs first, the fastest all-reduce), ``SPREAD``, ``STRICT_PACK`` (one
            node only) or ``STRICT_SPREAD`` (one worker per node).
        precision: autocast dtype, on GPU and CPU alike: ``bf16`` (no loss scaling
            needed), ``fp16`` (with a GradScaler) or ``fp32`` (no autocast); ``auto`` is
            bf16 on CUDA and fp32 elsewhere (:func:`cvaa.gan.resolve_precision`).
        memory_format: layout of the models' parameters and inputs, end to end:
            ``channels_last`` (NHWC for 2D tensors, NDHWC for 3D ones: cuDNN's tensor-core
            kernels then need no layout conversion around every conv), ``contiguous``
            (NCHW / NCDHW) or ``auto``: channels_last on CUDA, contiguous elsewhere
            (:func:`cvaa.models.layout.resolve_memory_format`). Same function either way.
        prefetch_batches: batches each worker reads ahead of its training step (its
            memory holds at most ``prefetch_batches + 1`` batches of cases, whatever the
            size of the dataset; :mod:`cvaa.data.stream`).
        io_threads: concurrent case reads (local or S3, and decompression) per worker.
        max_failures: worker failures survived by restoring the last checkpoint.
        storage_retry_s: how long rank 0 retries writing a checkpoint to a storage that
            does not answer (an S3 outage) before the run stops with the previous
            checkpoint intact (keep it below the DDP collective timeout, 30 min); also
            how long a worker retries reading a case from a storage that does not answer.
        mlflow_wait_s: how long the last epoch waits for a tracking server that is down
            to take the entries queued during the outage; what it has not taken by then
            stays in the last checkpoint, and the job says how to send it.
        checkpoints_to_keep: how many Ray Train checkpoints stay in storage.
        system_metrics_s: seconds between the MLflow system metrics rank 0 logs (CPU,
            memory, disk, network; GPU utilisation and memory per device where
            ``nvidia-ml-py`` is installed): a minute suits a run of days; ``0`` logs none.
        finite_check_every: steps between the host's checks that every loss stayed
            finite (each check waits for the device to drain, STYLE habit 12). ``0`` is
            every step on CPU (where nothing runs ahead, so nothing is ever stepped on a
            NaN) and every 25 steps on CUDA; a check also runs before every checkpoint, so
            a checkpoint never holds weights stepped on a NaN.
        compile: how ``cvaa.gan.GANTrainer`` runs the generator and discriminator
            forwards (their backward follows): ``none`` (eager), ``default``
            (``torch.compile``: Inductor fuses the elementwise and normalisation ops, so
            far fewer kernel launches), ``max-autotune`` (the same plus autotuned
            convolution/GEMM choices; torch's ``max-autotune-no-cudagraphs``, so it does not
            also capture CUDA graphs), ``cudagraphs`` (Inductor plus CUDA graphs, torch's
            ``reduce-overhead``: one launch per graph; CUDA only, eager-equivalent
            elsewhere) or ``auto``: ``default`` on CUDA (chosen by reasoning, not yet
            measured: it removes most of the ~3,000 launches per step without the CUDA
            graphs' static memory and replay constraints; ``bench/gpu_check.py`` measures
            every mode and must confirm it), ``none`` on a CPU (where compiling the
            cpu-preset models did not pay for its compile time, docs/performance.md).
            Shapes are compiled static and there is one per model: a short step (an
            epoch's last, a rank's padding step) is padded to the full per-worker batch with
            weight-0 samples (:mod:`cvaa.data.stream`), so nothing recompiles after the
            first steps; validation runs the eager model.
        cuda_shaped: take every branch a CUDA run takes, on whatever device runs: channel
            counts padded to multiples of 8, stride == kernel transposed convs as a GEMM,
            the layout-keeping instance norm and ``channels_last`` (``memory_format:
            auto``), fused Adam, ``compile: auto`` = ``default``, X-rays rendered in the
            step from tables built in the ingest threads, the finiteness check every 25
            steps (``finite_check_every: 0``). Only the kernels differ. A CPU rehearsal of
            a GPU run: the test suite runs the GPU path's logic this way on CPU.
            Precision still resolves against the real device (``auto``: fp32 on a CPU).
        cudnn_benchmark: let cuDNN time its convolution algorithms on the first call of
            each shape and keep the fastest (``torch.backends.cudnn.benchmark``; CUDA only).
            Off until ``bench/gpu_check.py`` (which times the same setting training uses,
            and both with ``--cudnn-benchmark off on``) shows it pays on a GPU.
    """

    epochs: int = 200
    batch_size: int = 4
    seed: int = 0
    val_fraction: float = 0.1
    calibration_cases: int = 0
    calibration_k: int = 8
    figure_every: int = 10
    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    accelerator_type: str = ""
    cpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    prefetch_batches: int = 4
    io_threads: int = 2
    max_failures: int = 2
    storage_retry_s: float = 600.0
    mlflow_wait_s: float = 300.0
    checkpoints_to_keep: int = 2
    system_metrics_s: float = 60.0
    finite_check_every: int = 0
    compile: Literal["auto", "none", "default", "max-autotune", "cudagraphs"] = "auto"
    cuda_shaped: bool = False
    cudnn_benchmark: bool = False


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    drr: DRRConfig = field(default_factory=DRRConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (tuples become lists), ready for YAML/JSON/MLflow."""
        return _to_builtin(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "dict") -> "Config":
        """Build a config from a (possibly partial) nested dict; unknown keys are errors."""
        return _merge(cls(), data, prefix="", source=source)

    def override(self, overrides: Sequence[str] | Mapping[str, Any], *,
                 source: str = "--set") -> "Config":
        """Apply dotted overrides, ``["a.b=v", ...]`` or ``{"a.b": v}``."""
        items = overrides.items() if isinstance(overrides, Mapping) else map(_split, overrides)
        cfg = self
        for key, value in items:
            cfg = _merge(cfg, _nest(key, value), prefix="", source=source)
        return cfg

    def validate(self, source: str = "config") -> "Config":
        """Check the fields against each other (each field alone is checked on load).

        Raises:
            ConfigError: naming the keys that disagree and what they must satisfy.
        """
        size, pixels = self.preprocess.size, self.drr.detector_pixels
        if pixels != size:
            raise ConfigError(f"{source}: drr.detector_pixels={pixels} must equal "
                              f"preprocess.size={size} (the 2D->3D expansion maps detector "
                              "pixels to voxels)")
        t = self.train
        if t.batch_size < 1 or t.num_workers < 1 or t.batch_size % t.num_workers:
            raise ConfigError(f"{source}: train.batch_size={t.batch_size} is the global batch "
                              f"and must be a positive multiple of train.num_workers="
                              f"{t.num_workers} (each worker steps on an equal share)")
        if t.calibration_cases < 0 or t.calibration_k < 1:
            raise ConfigError(f"{source}: train.calibration_cases={t.calibration_cases} must "
                              f"be >= 0 and train.calibration_k={t.calibration_k} >= 1")
        if t.prefetch_batches < 1 or t.io_threads < 1:
            raise ConfigError(f"{source}: train.prefetch_batches={t.prefetch_batches} and "
                              f"train.io_threads={t.io_threads} must be >= 1")
        a = self.augment
        if not 0.0 <= a.clean_fraction <= 1.0 or not 0.0 <= a.window_prob <= 1.0:
            raise ConfigError(f"{source}: augment.clean_fraction={a.clean_fraction} and "
                              f"augment.window_prob={a.window_prob} must be in [0, 1]")
        if not 0.0 <= a.distance_frac < 0.5 or not 0.0 <= a.zoom_frac < 0.5:
            raise ConfigError(f"{source}: augment.distance_frac={a.distance_frac} and "
                              f"augment.zoom_frac={a.zoom_frac} must be in [0, 0.5)")
        if a.photons_max and not 0 < a.photons_min <= a.photons_max:
            raise ConfigError(f"{source}: augment.photons_min={a.photons_min} must be in "
                              f"(0, photons_max={a.photons_max}]")
        if a.enabled and self.preprocess.context_margin_mm <= 0:
            raise ConfigError(f"{source}: augment.enabled needs the context CT "
                              f"(preprocess.context_margin_mm > 0)")
        if t.storage_retry_s < 0 or t.mlflow_wait_s < 0 or t.system_metrics_s < 0:
            raise ConfigError(f"{source}: train.storage_retry_s={t.storage_retry_s}, "
                              f"train.mlflow_wait_s={t.mlflow_wait_s} and "
                              f"train.system_metrics_s={t.system_metrics_s} must be >= 0")
        dicom = self.dicom
        if dicom.min_slices < 2 or dicom.max_slice_spacing_mm < 0:
            raise ConfigError(f"{source}: dicom.min_slices={dicom.min_slices} must be >= 2 and "
                              f"dicom.max_slice_spacing_mm={dicom.max_slice_spacing_mm} >= 0")
        try:
            re.compile(dicom.sharp_kernel_pattern)
        except re.error as exc:
            raise ConfigError(f"{source}: dicom.sharp_kernel_pattern is not a regular "
                              f"expression ({exc})") from exc
        if self.optim.reference_batch < 1:
            raise ConfigError(f"{source}: optim.reference_batch must be >= 1, got "
                              f"{self.optim.reference_batch}")
        m = self.model
        if m.generator in ("cvaa", "x2ct"):
            stages = len(m.dense_layers)
            if stages < 1:
                raise ConfigError(f"{source}: model.dense_layers needs at least one stage")
            if len(m.encoder_channels) != stages:
                raise ConfigError(f"{source}: model.encoder_channels needs one entry per "
                                  f"stage of model.dense_layers ({stages}), got "
                                  f"{list(m.encoder_channels)}")
            if len(m.decoder_channels) != stages + 1:
                raise ConfigError(f"{source}: model.decoder_channels needs stages + 1 = "
                                  f"{stages + 1} entries, got {list(m.decoder_channels)}")
            if size % 2 ** stages:
                raise ConfigError(f"{source}: preprocess.size={size} must be a multiple of "
                                  f"2^{stages} for the {stages} stages of model.dense_layers")
            if m.generator == "x2ct" and size // 2 ** stages < 2:
                raise ConfigError(f"{source}: model.generator='x2ct' needs a deepest scale "
                                  f"preprocess.size / 2^stages >= 2, got {size} / 2^{stages} = "
                                  f"{size // 2 ** stages}: use fewer model.dense_layers stages "
                                  f"(X2CT-GAN: 128 -> 4 in 5)")
            if m.generator == "x2ct" and min(m.dense_layers + m.decoder_channels) < 1:
                raise ConfigError(f"{source}: model.generator='x2ct' needs positive "
                                  f"model.dense_layers {list(m.dense_layers)} and "
                                  f"model.decoder_channels {list(m.decoder_channels)}")
        return self

    def flat(self) -> dict[str, Any]:
        """``{"drr.sad_mm": 1000.0, ...}``: every leaf under its dotted key."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out

    def hash(self, *sections: str) -> str:
        """Stable short hash of the named sections (all when none), e.g. for caching."""
        data = self.to_dict()
        chosen = {s: data[s] for s in (sections or tuple(data))}
        blob = json.dumps(chosen, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Presets are overrides of the defaults, so the dataclasses stay the one source of values.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper: 2 mm, 128^3 crop (256 mm field of view), 128^2 X-rays, X2CT-GAN widths.
    "paper": {},
    # CPU demo and tests: the same 256 mm field of view at 8 mm, 32^3, narrow networks.
    "cpu": {
        "preprocess": {"spacing_mm": 8.0, "size": 32},
        "drr": {"detector_pixels": 32, "step_mm": 4.0},
        "model": {
            "stem_channels": 8,
            "growth": 4,
            "dense_layers": (1, 1, 1),
            "encoder_channels": (16, 24, 32),
            "decoder_channels": (32, 16, 8, 8),
            # Baselines as wide as the two-view generators (~0.2 M parameters each):
            # PSR's last layer must hold a 32-voxel depth profile per pixel.
            "unet_channels": (12, 24, 48),
            "psr_channels": (32, 48, 64),
            "disc_channels": (8, 16, 32),
            "disc_expand_channels": 4,
        },
        # A CPU run takes a few hundred steps, not the paper's ~10k: a 5x larger step
        # (measured in docs/results.md: 2e-4 stays below the mean volume at this budget).
        "optim": {"lr_g": 1e-3, "lr_d": 1e-3, "constant_epochs": 8, "decay_epochs": 8},
        "train": {"epochs": 16, "batch_size": 4, "figure_every": 4,
                  # The embedded default ends with a calibrated version: 40 phantoms (the
                  # fewest a calibration takes is 30) held out of 112, so that training
                  # keeps about the 46 cases it had with 64 phantoms and no hold-out.
                  "calibration_cases": 40},
        "data": {"n_phantoms": 112},
    },
}
# The same with train-time X-ray randomisation (cvaa.data.augment) on.
PRESETS["paper-augment"] = {**PRESETS["paper"], "augment": {"enabled": True}}
PRESETS["cpu-augment"] = {**PRESETS["cpu"], "augment": {"enabled": True}}


def load_config(preset: str = "paper", config_file: str | Path | None = None,
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Resolve defaults <- preset <- YAML file <- dotted overrides.

    Example:
        >>> load_config("cpu", overrides=["preprocess.size=16"]).preprocess.size
        16
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; valid presets: {sorted(PRESETS)}")
    cfg = Config.from_dict(PRESETS[preset], source=f"preset {preset!r}")
    if config_file is not None:
        path = Path(config_file)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        cfg = _merge(cfg, data, prefix="", source=str(path))
    return cfg.override(overrides).validate(f"preset {preset!r}"
                                            + (f" + {config_file}" if config_file else "")
                                            + (" + --set" if overrides else ""))


def parse_value(text: str) -> Any:
    """Parse a CLI/YAML scalar; unlike plain YAML, ``1e-4`` is a float."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _split(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    return key.strip(), parse_value(value)


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(obj: Any, data: Mapping[str, Any], *, prefix: str, source: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{source}: unknown config key {dotted!r}; "
                              f"valid keys here: {sorted(known)}")
        current = getattr(obj, key)
        if is_dataclass(current):
            changes[key] = _merge(current, value, prefix=f"{dotted}.", source=source)
        else:
            changes[key] = _coerce(value, hints[key], dotted, source)
    return replace(obj, **changes)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against the field's type hint, converting where lossless."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{source}: {key}={value!r} is not a valid {_hint_name(hint)}")

    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}={value!r} must be one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None) and value is None:
                return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key, source)
                except ConfigError:
                    continue
        fail()
    if origin is tuple:
        if isinstance(value, str):
            value = parse_value(value) if value.strip().startswith("[") else [
                parse_value(v) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            fail()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key} needs {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        fail()
    if hint is int:
        if isinstance(value, bool):
            fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        fail()
    if hint is float:
        if isinstance(value, bool):
            fail()
        if isinstance(value, str):
            value = parse_value(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        fail()
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        fail()
    return value


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _to_builtin(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_builtin(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_builtin(v) for v in obj]
    return obj


__all__ = [
    "Config", "ConfigError", "DataConfig", "PreprocessConfig", "DRRConfig", "ModelConfig",
    "LossConfig", "OptimConfig", "TrainConfig", "DicomConfig", "PRESETS", "load_config",
    "parse_value",
]
