"""One GAN training step, the optimisers and the LR schedule: plain torch, no Ray.

The paper trains G and D alternately (section II, "alternatively trained") with Adam
(lr 2e-4, betas 0.5 / 0.99; section III.B) on the LSGAN objective (eq. 1) plus the
reconstruction and projection losses (section II.B). Generators without a discriminator
(``3dcnn``, ``psr``) take only the G step, without the adversarial term.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from cvaa.config import Config, OptimConfig
from cvaa.losses import generator_loss, lsgan_d_loss
from cvaa.models.blocks import set_cuda_shaped
from cvaa.models.layout import (resolve_memory_format, tensor_to_memory_format,
                               to_memory_format)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; training stops and keeps the last good checkpoint."""


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (what a checkpoint saves)."""
    return getattr(module, "module", module)


def lr_factor(epoch: int, cfg: OptimConfig) -> float:
    """Constant for ``constant_epochs``, then linear decay towards 0 over ``decay_epochs``
    (X2CT-GAN's schedule). ``epoch`` counts from 0."""
    if epoch < cfg.constant_epochs or cfg.decay_epochs <= 0:
        return 1.0
    return max(0.0, 1.0 - (epoch - cfg.constant_epochs + 1) / (cfg.decay_epochs + 1))


def scaled_lr(lr: float, cfg: Config) -> float:
    """``lr`` (chosen for ``optim.reference_batch``) at the global batch
    ``train.batch_size``, by ``optim.lr_scaling``.

    Example:
        >>> from cvaa.config import load_config
        >>> cfg = load_config("paper", overrides=["train.batch_size=32", "train.num_workers=8",
        ...                                       "optim.lr_scaling=linear"])
        >>> round(scaled_lr(2e-4, cfg), 6)
        0.0016
    """
    ratio = cfg.train.batch_size / cfg.optim.reference_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.optim.lr_scaling]
    return lr * factor


def per_worker_batch(cfg: Config) -> int:
    """Cases per DDP rank and step: the global ``train.batch_size`` over the workers."""
    return cfg.train.batch_size // cfg.train.num_workers


def branch_device(cfg: Config, device: torch.device) -> torch.device:
    """The device whose code paths a run on ``device`` takes: CUDA when
    ``train.cuda_shaped`` (a CPU rehearsal of a GPU run), else ``device`` itself. Every
    ``auto`` setting (layout, compile, fused Adam, rendering in the step, the finiteness
    check's interval) resolves against it; precision resolves against the real device.

    Example:
        >>> from cvaa.config import load_config
        >>> branch_device(load_config("cpu", overrides=["train.cuda_shaped=true"]),
        ...               torch.device("cpu")).type
        'cuda'
    """
    return torch.device("cuda") if cfg.train.cuda_shaped else device


def make_optimizer(params, lr: float, cfg: OptimConfig,
                   fused: bool | None = None) -> torch.optim.Adam:
    """Adam with the paper's betas; the fused kernel (``fused=None``) when every parameter
    is on CUDA (one launch per step instead of ~a dozen per parameter group chunk; measured
    15 ms of a 582 ms H200 step unfused), torch's own choice (foreach) elsewhere; ``True``
    forces it (CPU has it too). The state dict is the same either way, so checkpoints move
    between devices and optimisers."""
    params = list(params)
    if fused is None:
        fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def relayout_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor of ``optimizer`` its parameter's memory layout.

    ``Optimizer.load_state_dict`` moves state to the parameter's device and dtype but keeps
    the layout it was saved in: a contiguous checkpoint (a CPU run, ``memory_format:
    contiguous``, an older checkpoint) loaded under channels-last parameters leaves Adam's
    moments contiguous, and the fused kernel then steps element ``i`` of the gradient with
    element ``i`` of a differently strided moment (measured on CPU: an update off by 3.6e-3
    at lr 1e-3), or raises on CUDA. Values are unchanged; only the strides follow the
    parameter.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if (isinstance(value, torch.Tensor) and value.shape == p.shape
                        and value.stride() != p.stride()):
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def gradient_norm(parameters) -> torch.Tensor | None:
    """The 2-norm of all gradients together, a 0-dim tensor on their device (``None``
    without gradients): finite exactly when every gradient is. One foreach reduction, no
    read back to the host."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process so far (dynamo's own
    count of unique graphs); 0 where dynamo keeps no such counter. A run compiles each of
    its callables once; a growing count after the first steps means recompilation."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - a torch without dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run on ``device`` trains in: ``auto`` is bf16 on CUDA, fp32 elsewhere.

    Explicit ``bf16``/``fp16``/``fp32`` pass through on every device (CPU autocast runs
    them too, so tests exercise each branch).

    Example:
        >>> resolve_precision("auto", torch.device("cpu"))
        'fp32'
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in _AUTOCAST_DTYPES and precision != "fp32":
        raise ValueError(f"precision={precision!r} must be one of "
                         f"['auto', 'bf16', 'fp16', 'fp32']")
    return precision


# train.compile -> torch.compile's mode (None: eager). ``max-autotune`` leaves CUDA graphs to
# ``cudagraphs``, so the two effects can be measured apart.
_COMPILE_MODES = {"none": None, "default": "default",
                  "max-autotune": "max-autotune-no-cudagraphs",
                  "cudagraphs": "reduce-overhead"}


def resolve_compile(mode: str, device: torch.device) -> str:
    """The ``train.compile`` setting a run on ``device`` uses: ``auto`` is ``default`` on
    CUDA and ``none`` elsewhere (see :class:`cvaa.config.TrainConfig`).

    Example:
        >>> [resolve_compile("auto", torch.device(d)) for d in ("cpu", "cuda")]
        ['none', 'default']
    """
    if mode == "auto":
        return "default" if device.type == "cuda" else "none"
    if mode not in _COMPILE_MODES:
        raise ValueError(f"train.compile={mode!r} must be one of "
                         f"{['auto', *_COMPILE_MODES]}")
    return mode


def compiled(module: nn.Module, mode: str) -> Callable[..., Any]:
    """``module`` itself for ``none``, else ``torch.compile(module)`` with static
    shapes (the module, and so its state dict keys, unchanged: no ``_orig_mod.``)."""
    if _COMPILE_MODES[mode] is None:
        return module
    return torch.compile(module, mode=_COMPILE_MODES[mode], dynamic=False)


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on ``device``'s type (CUDA or CPU); no autocast for fp32.

    Autocast only casts op inputs: parameters (and so checkpoints) stay float32.
    """
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])


@dataclass
class GANTrainer:
    """Holds G, D (or ``None``), their optimisers and the loss scaler; steps them.

    Args:
        generator, discriminator: the models, possibly DDP-wrapped.
        cfg: the resolved config (loss weights, optimiser, precision).
        device: where the batches go; ``train.precision="auto"`` resolves against it
            (:func:`resolve_precision`).
    """

    generator: nn.Module
    discriminator: nn.Module | None
    cfg: Config
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    # Agrees on finiteness across DDP ranks (all ranks must skip a step together, or the
    # ones that step wait forever for the others' gradients). Identity on one process.
    all_finite: Callable[[bool], bool] = staticmethod(lambda ok: ok)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        o = self.cfg.optim
        lr_g, lr_d = scaled_lr(o.lr_g, self.cfg), scaled_lr(o.lr_d, self.cfg)
        # Every `auto` below resolves against the branches this run takes: CUDA's on a GPU,
        # and on any device under train.cuda_shaped (then the layers take their CUDA
        # formulations too).
        self.branches = branch_device(self.cfg, self.device)
        # One memory layout end to end (channels-last on CUDA by default; STYLE habit 12):
        # parameters converted here, before the optimisers hold them, and every batch at the
        # top of the step. A DDP-wrapped model is converted by whoever wraps it, before
        # wrapping (cvaa.loop.setup): DDP holds the parameters as they were then.
        self.memory_format = resolve_memory_format(self.cfg.train.memory_format,
                                                   self.branches)
        for module in (self.generator, self.discriminator):
            if module is not None and unwrap(module) is module:
                to_memory_format(module, self.memory_format)
            if module is not None and self.cfg.train.cuda_shaped:
                set_cuda_shaped(unwrap(module))
        fused = self.branches.type == "cuda"
        self.opt_g = make_optimizer(self.generator.parameters(), lr_g, o, fused)
        self.opt_d = (make_optimizer(self.discriminator.parameters(), lr_d, o, fused)
                      if self.discriminator is not None else None)
        self.base_lr = {"g": lr_g, "d": lr_d}
        self.precision = resolve_precision(self.cfg.train.precision, self.device)
        # fp16's 5-bit exponent underflows small gradients: scale the loss (on any device).
        # bf16 has fp32's exponent range and needs no scaler.
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.precision == "fp16")
        # The step calls compiled forwards; self.generator / self.discriminator stay the
        # (DDP) modules, so state dicts, optimisers and callers see the same objects in
        # every mode. torch.compile over a DDP module is torch's supported path (its
        # DDPOptimizer splits the graph at the gradient buckets). The loss weight and
        # set_requires_grad stay outside the compiled regions: D runs with gradients
        # (D step) and frozen (G step) as two callables, each compiled once.
        self.compile_mode = resolve_compile(self.cfg.train.compile, self.branches)
        self._generator = compiled(self.generator, self.compile_mode)
        self._discriminator = self._frozen_discriminator = None
        if self.discriminator is not None:
            self._discriminator = compiled(self.discriminator, self.compile_mode)
            self._frozen_discriminator = compiled(unwrap(self.discriminator),
                                                  self.compile_mode)
        every = self.cfg.train.finite_check_every
        if every < 0:
            raise ValueError(f"train.finite_check_every must be >= 0, got {every}")
        self.check_every = every or (25 if self.branches.type == "cuda" else 1)
        self._unchecked = 0
        self._finite: dict[str, torch.Tensor] = {}   # name -> all finite since last check
        self._last: dict[str, torch.Tensor] = {}     # name -> a loss (non-finite if any)

    def set_epoch(self, epoch: int) -> None:
        """Apply the LR schedule for ``epoch`` (0-based)."""
        factor = lr_factor(epoch, self.cfg.optim)
        for group in self.opt_g.param_groups:
            group["lr"] = self.base_lr["g"] * factor
        if self.opt_d is not None:
            for group in self.opt_d.param_groups:
                group["lr"] = self.base_lr["d"] * factor

    def step(self, xrays: torch.Tensor, target: torch.Tensor,
             weight: float | torch.Tensor = 1.0) -> dict[str, torch.Tensor]:
        """One D step then one G step on a batch, without waiting for the device.

        Args:
            xrays: ``(B, 2, P, P)`` in [0, 1]; target: ``(B, 1, D, H, W)`` in [0, 1].
            weight: ``1`` (a real step), ``0`` (a padding step: this rank takes part in
                DDP's gradient all-reduce, which every rank must join, without adding to
                the gradients; :mod:`cvaa.data.stream`), or a ``(B,)`` tensor of 1 (a real
                sample) and 0 (a padding sample, which fills a short batch to the compiled
                shape): the losses are the means over the real samples. The returned
                losses are unweighted (the plain means for a padding step).

        Returns:
            ``{"loss_d", "loss_g", "loss_adv", "loss_rec", "loss_proj"}`` as detached fp32
            0-dim tensors on the device. Nothing here reads a value back to the host (a
            read blocks the CPU until the GPU drains, so it could not queue the next step's
            kernels; STYLE habit 12): sum them on the device and read them once per
            logging interval.

        Raises:
            NonFiniteLossError: from the finiteness check (:meth:`check_finite`), which runs
                every ``train.finite_check_every`` steps and covers the losses and the
                gradients: on CPU every step, before anything is stepped; on CUDA the step
                where a loss or gradient went NaN and those up to the check may have
                stepped, which the caller discards (it checks before each checkpoint). An
                fp16 gradient overflow with a finite loss is not an error: the scaler
                skips that update and lowers its scale.
        """
        xrays = tensor_to_memory_format(xrays, self.memory_format)
        target = tensor_to_memory_format(target, self.memory_format)
        n = xrays.shape[0]
        sample_weight, real = self._sample_weights(weight, n)
        amp = autocast_context(self.device, self.precision)
        out: dict[str, torch.Tensor] = {}
        if self.compile_mode == "cudagraphs":
            # A new iteration: the graphs' output buffers of the last step may be reused.
            torch.compiler.cudagraph_mark_step_begin()
        # Networks run under autocast; their outputs are cast to float32 and the losses
        # computed outside it, so losses, metrics and the NaN guard see fp32 values.
        with amp:
            fake = self._generator(xrays).float()             # (B, 1, D, H, W)
        if self.discriminator is not None:
            # D step: real vs detached fake (LSGAN, eq. 1) in one forward (D's instance
            # norm is per sample, so this equals two), so DDP reduces D's gradients once.
            set_requires_grad(self.discriminator, True)
            with amp:
                scores = self._discriminator(torch.cat([xrays, xrays]),
                                            torch.cat([target, fake.detach()]))
            loss_d = lsgan_d_loss(scores[:n].float(), scores[n:].float(), sample_weight)
            self._guard("D loss", loss_d)
            self.opt_d.zero_grad(set_to_none=True)
            # With fp16 a finite loss can still give inf gradients (scale too large):
            # scaler.step then skips the update and update() lowers the scale. Gradients
            # are all-reduced by DDP before unscaling, so every rank skips together.
            self.scaler.scale(loss_d * real).backward()
            self._guard_gradients("D gradient", self.discriminator)
            self.scaler.step(self.opt_d)
            out["loss_d"] = loss_d.detach()
            # G step: D's weights frozen; the unwrapped D avoids a DDP reduction for a
            # forward whose parameters get no gradient.
            set_requires_grad(self.discriminator, False)
            with amp:
                d_fake = self._frozen_discriminator(xrays, fake).float()
        else:
            d_fake = None
        loss_g, parts = generator_loss(fake, target, d_fake, self.cfg.loss, sample_weight)
        self._guard("G loss", loss_g)
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(loss_g * real).backward()
        self._guard_gradients("G gradient", self.generator)
        self.scaler.step(self.opt_g)
        self.scaler.update()
        if self.discriminator is not None:
            set_requires_grad(self.discriminator, True)
        out["loss_g"] = loss_g.detach()
        out.update({f"loss_{k}": v.detach() for k, v in parts.items() if k != "total"})
        self._unchecked += 1
        if self._unchecked >= self.check_every:
            self.check_finite()
        return out

    def _sample_weights(self, weight: float | torch.Tensor, n: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(per-sample weights that average the real samples (B,), 1 or 0: whether
        the step has any)``, on the device, without a host read. With no real sample the
        weights average all ``n`` (the losses are still computed, and reported, as plain
        means) and the step multiplier is 0."""
        if isinstance(weight, torch.Tensor):
            if weight.shape != (n,):
                raise ValueError(f"weight must be a float or a ({n},) tensor, got shape "
                                 f"{tuple(weight.shape)}")
            w = weight.to(self.device, torch.float32, non_blocking=True)
        else:
            w = torch.full((n,), float(weight), device=self.device)
        total = w.sum()
        any_real = total > 0
        averaging = torch.where(any_real, w / total.clamp(min=1e-12),
                                torch.full_like(w, 1.0 / n))
        return averaging, any_real.float()

    def _guard(self, name: str, value: torch.Tensor) -> None:
        """Checks ``value`` now when every step is checked (nothing is stepped on a NaN);
        otherwise remembers it on the device for the next :meth:`check_finite`."""
        value = value.detach()
        if self.check_every == 1:
            number = float(value)
            if not self.all_finite(math.isfinite(number)):
                raise NonFiniteLossError(f"{name} is {number} on this rank; a rank's "
                                         f"{name} was NaN or inf")
            return
        finite = torch.isfinite(value)
        if name not in self._finite:
            self._finite[name], self._last[name] = finite, value.float()
        else:  # keeps the latest non-finite value, for the message
            self._finite[name] = self._finite[name] & finite
            self._last[name] = torch.where(finite, self._last[name], value.float())

    def _guard_gradients(self, name: str, module: nn.Module) -> None:
        """A non-finite gradient with finite losses (e.g. an overflow in a backward) must
        never reach a checkpoint: its finiteness joins the losses' in the same check. With
        fp16 the scaler owns this (it skips the update)."""
        if self.scaler.is_enabled():
            return
        norm = gradient_norm(module.parameters())
        if norm is not None:
            self._guard(name + " norm", norm)

    def check_finite(self) -> None:
        """Reads the losses' finiteness since the last check back to the host (one wait for
        the device) and agrees on it across ranks; every rank must call it at the same step.

        Raises:
            NonFiniteLossError: if a loss on any rank was NaN or inf since the last check.
        """
        unchecked, self._unchecked = self._unchecked, 0
        if not self._finite:
            return
        flags = {name: bool(ok) for name, ok in self._finite.items()}
        last = {name: float(v) for name, v in self._last.items()}
        self._finite.clear()
        self._last.clear()
        if self.all_finite(all(flags.values())):
            return
        bad = [name for name, ok in flags.items() if not ok] or list(flags)
        name = bad[0]
        raise NonFiniteLossError(
            f"{name} is {last[name]} on this rank at the last of {unchecked} steps "
            f"since the last check; a rank's loss or gradient was NaN or inf")

    # ----------------------------------------------------------------- checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: weights, optimisers, scaler (tensors and builtins
        only, so ``torch.load(..., weights_only=True)`` reads it)."""
        return {
            "generator": unwrap(self.generator).state_dict(),
            "discriminator": (unwrap(self.discriminator).state_dict()
                              if self.discriminator is not None else None),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`, whatever layout, device or Adam implementation
        (fused, foreach) wrote it: weights are copied into this trainer's parameters (their
        layout kept) and the optimiser state re-laid in each parameter's layout
        (:func:`relayout_optimizer_state`)."""
        unwrap(self.generator).load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["opt_g"])
        relayout_optimizer_state(self.opt_g)
        if self.discriminator is not None:
            unwrap(self.discriminator).load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["opt_d"])
            relayout_optimizer_state(self.opt_d)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
