"""Search spaces for ``jobs/tune.py``: YAML over dotted config keys, checked before any trial.

A space file maps dotted config keys to one distribution each::

    # tune_spaces/optim.yaml
    optim.lr_g: {loguniform: [1e-5, 1e-3]}   # log-uniform in [low, high]
    optim.lr_d: {uniform: [5e-5, 5e-4]}      # uniform in [low, high]
    optim.beta1: {choice: [0.5, 0.9]}        # one of the values, drawn per sample
    loss.proj: {grid: [0, 10]}               # every value, crossed with the samples

``grid`` dimensions are crossed with each other and with the ``--samples`` draws of the
others (Tune's ``num_samples``): a sweep has ``samples * grid_size`` trials.

Every key, bound and value is checked against the config here, without Ray, so a bad file
fails before any trial starts, with an error naming the file and the key::

    space = load_space("tune_spaces/optim.yaml", load_config("cpu"))
    cfg = space.apply(load_config("cpu"), {"optim.lr_g": 1e-4, "optim.beta1": 0.9})

Numbers like ``1e-4`` (a string to plain YAML) are read as floats, as on the command line.
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from cvaa.config import Config, ConfigError, parse_value

RANGES = ("loguniform", "uniform")     # [low, high] of a numeric field
SETS = ("choice", "grid")              # a non-empty list of values of the field's type
DISTRIBUTIONS = RANGES + SETS

# Keys a sweep fixes for all its trials: the prepared dataset decides the data sections;
# the trial resources and ASHA's max_t are computed once from these.
FIXED_SECTIONS = {"data": "the prepared dataset", "preprocess": "the prepared dataset",
                  "drr": "the prepared dataset"}
FIXED_KEYS = {
    "train.epochs": "ASHA's max_t (use --epochs)",
    "train.num_workers": "the trial resources (use --workers-per-trial)",
    "train.use_gpu": "the trial resources (use --gpus-per-trial)",
    "train.gpus_per_worker": "the trial resources (use --gpus-per-trial)",
    "train.cpus_per_worker": "the trial resources (use --set train.cpus_per_worker=...)",
    "train.accelerator_type": "the trial resources",
}


class SpaceError(ConfigError):
    """A search-space file that does not fit the config (names the file and the key)."""


@dataclass(frozen=True)
class Dimension:
    """One tuned config key.

    Args:
        key: dotted config key, e.g. ``optim.lr_g``.
        distribution: one of :data:`DISTRIBUTIONS`.
        values: ``(low, high)`` for ranges, the candidates for ``choice``/``grid``; typed
            like the config field (tuples as lists, so trial configs stay JSON).
        integer: the field is an ``int``: ranges draw whole numbers in ``[low, high]``.
    """

    key: str
    distribution: str
    values: tuple[Any, ...]
    integer: bool = False

    def describe(self) -> str:
        """``loguniform(1e-05, 0.001)``, ``grid([0.0, 10.0])``."""
        if self.distribution in RANGES:
            return f"{self.distribution}({self.values[0]!r}, {self.values[1]!r})"
        return f"{self.distribution}({list(self.values)!r})"

    def to_tune(self) -> Any:
        from ray import tune

        if self.distribution == "grid":
            return tune.grid_search(list(self.values))
        if self.distribution == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.integer:  # Tune's integer ranges exclude the upper bound
            sampler = tune.lograndint if self.distribution == "loguniform" else tune.randint
            return sampler(int(low), int(high) + 1)
        sampler = tune.loguniform if self.distribution == "loguniform" else tune.uniform
        return sampler(float(low), float(high))


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: where it came from and its dimensions, in file order."""

    source: str
    dimensions: tuple[Dimension, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(d.key for d in self.dimensions)

    @property
    def grid_size(self) -> int:
        """Trials per sample: the product of the grid dimensions' lengths (1 without)."""
        return math.prod(len(d.values) for d in self.dimensions if d.distribution == "grid")

    def describe(self) -> dict[str, str]:
        return {d.key: d.describe() for d in self.dimensions}

    def to_tune(self) -> dict[str, Any]:
        """Tune's ``param_space``: ``{"optim.lr_g": tune.loguniform(...), ...}``."""
        return {d.key: d.to_tune() for d in self.dimensions}

    def apply(self, cfg: Config, values: Mapping[str, Any]) -> Config:
        """``cfg`` with one trial's sampled values (which must be this space's keys)."""
        unknown = sorted(set(values) - set(self.keys))
        if unknown:
            raise SpaceError(f"{self.source}: trial values for keys not in the space: "
                             f"{unknown}")
        return cfg.override(dict(values), source=f"trial of {self.source}")


def load_space(path: str | Path, base: Config) -> SearchSpace:
    """Read and validate a space file against ``base`` (the sweep's resolved config).

    Raises:
        SpaceError: unreadable file, unknown key, unknown distribution, bad bounds or
            values of the wrong type; the message names the file and the key.

    Example:
        >>> from cvaa.config import load_config
        >>> load_space("tune_spaces/optim.yaml", load_config("cpu")).keys
        ('optim.lr_g', 'optim.lr_d', 'optim.beta1')
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpaceError(f"{path}: cannot read search space ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML ({exc})") from exc
    return parse_space(data, base, source=str(path))


def parse_space(data: Any, base: Config, *, source: str = "space") -> SearchSpace:
    """Validate an already-loaded space mapping (see :func:`load_space`)."""
    if not isinstance(data, Mapping) or not data:
        raise SpaceError(f"{source}: a search space is a non-empty mapping of dotted config "
                         "keys to distributions, e.g. optim.lr_g: {loguniform: [1e-5, 1e-3]}")
    flat = base.flat()
    dims = tuple(_dimension(key, spec, base, flat, source) for key, spec in data.items())
    return SearchSpace(source=source, dimensions=dims)


def _dimension(key: Any, spec: Any, base: Config, flat: dict[str, Any],
               source: str) -> Dimension:
    key = str(key)
    where = f"{source}: {key}"
    if key not in flat:
        hint = ""
        if key in base.to_dict():
            hint = f" (write dotted keys, e.g. '{key}.{next(iter(base.to_dict()[key]))}')"
        else:
            close = difflib.get_close_matches(key, flat, n=3)
            hint = f"; did you mean {close}?" if close else ""
        raise SpaceError(f"{source}: unknown config key {key!r}{hint}")
    section = key.split(".", 1)[0]
    if section in FIXED_SECTIONS:
        raise SpaceError(f"{where}: cannot be tuned: fixed by {FIXED_SECTIONS[section]}")
    if key in FIXED_KEYS:
        raise SpaceError(f"{where}: cannot be tuned: it sets {FIXED_KEYS[key]}")
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise SpaceError(f"{where}: needs exactly one distribution, e.g. "
                         "{loguniform: [1e-5, 1e-3]}; got " + repr(spec))
    (distribution, args), = spec.items()
    if distribution not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: unknown distribution {distribution!r}; "
                         f"valid: {list(DISTRIBUTIONS)}")
    hint = _field_hint(base, key)
    if distribution in RANGES:
        return _range(key, distribution, args, hint, base, where, source)
    if not isinstance(args, (list, tuple)) or not args:
        raise SpaceError(f"{where}: {distribution} needs a non-empty list of values, "
                         f"got {args!r}")
    values = tuple(_typed(key, v, base, source) for v in args)
    return Dimension(key, distribution, values)


def _range(key: str, distribution: str, args: Any, hint: Any, base: Config, where: str,
           source: str) -> Dimension:
    if hint not in (int, float):
        raise SpaceError(f"{where}: {distribution} needs a numeric field; this one is "
                         f"{getattr(hint, '__name__', hint)} (use choice or grid)")
    if not isinstance(args, (list, tuple)) or len(args) != 2:
        raise SpaceError(f"{where}: {distribution} needs [low, high], got {args!r}")
    low, high = (_number(v, where) for v in args)
    if not low < high:
        raise SpaceError(f"{where}: {distribution} needs low < high, got [{low!r}, {high!r}]")
    if distribution == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform needs positive bounds, got [{low!r}, {high!r}]")
    low, high = (_typed(key, v, base, source) for v in (low, high))
    return Dimension(key, distribution, (low, high), integer=hint is int)


def _number(value: Any, where: str) -> float | int:
    if isinstance(value, str):
        value = parse_value(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value):
        raise SpaceError(f"{where}: bounds must be finite numbers, got {value!r}")
    return value


def _typed(key: str, value: Any, base: Config, source: str) -> Any:
    """``value`` coerced to the field's type by the config itself (strings parsed like
    ``--set``), returned as builtins; a wrong type raises naming the file and key."""
    if isinstance(value, str):
        value = parse_value(value)
    section, name = key.split(".", 1)
    try:
        cfg = base.override({key: value}, source=source)
    except ConfigError as exc:
        raise SpaceError(str(exc)) from exc
    return cfg.to_dict()[section][name]


def _field_hint(base: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    return typing.get_type_hints(type(getattr(base, section)))[name]


__all__ = ["DISTRIBUTIONS", "Dimension", "SearchSpace", "SpaceError", "load_space",
           "parse_space"]
