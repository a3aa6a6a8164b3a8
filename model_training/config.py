"""Typed training and evaluation configs with file and ``--key=value`` overrides.

A run is fully described by a :class:`TrainConfig` (which nests the model's
:class:`model_training.model.ModelConfig` under ``model``). Values are resolved in three layers:

1. the dataclass defaults, which are the paper's settings (method.md §3.4);
2. an optional YAML or JSON file (``--config FILE``), nested (``model: {d_model: 64}``) or
   dotted (``model.d_model: 64``);
3. command-line overrides ``--key=value`` (``--epochs=3 --model.d_model=64``).

Every key is checked against the dataclass fields and every value against the field's type
annotation (int, float, bool, str, ``Literal``, tuples/lists, ``X | None``, nested dataclasses).
An unknown key or an ill-typed value raises :class:`fhir_mappings.errors.ConfigError` naming the key
and where it came from, instead of being silently ignored (nanoGPT's override idea without
``exec``). The resolved config is saved in every checkpoint as plain JSON-able values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from fhir_mappings.errors import ConfigError
from fhir_mappings.tasks import TASKS
from model_training.model import ModelConfig

C = TypeVar("C")


@dataclass
class TrainConfig:
    """Everything that defines a training run; defaults reproduce the paper (method.md §3)."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model architecture"})
    seed: int = field(default=0, metadata={"help": "seed for model init, shuffling, crops and dropout"})
    epochs: int = field(default=40, metadata={"help": "number of training epochs"})
    batch_size: int = field(
        default=32, metadata={"help": "records per optimisation step (per process under DDP)"}
    )
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (constant schedule)"})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay"})
    focal_gamma: float = field(default=2.0, metadata={"help": "focusing parameter of the binary focal loss"})
    train_folds: tuple[int, ...] = field(
        default=tuple(range(18)), metadata={"help": "strat_fold values used for training and medians"}
    )
    val_fold: int = field(default=18, metadata={"help": "strat_fold used for model selection"})
    test_fold: int = field(default=19, metadata={"help": "strat_fold held out for the final test"})
    tasks: tuple[str, ...] = field(
        default=TASKS,
        metadata={"help": "tasks whose targets are trained jointly (est, mon30, mon60, mon120)"},
    )
    use_missing_indicators: bool = field(
        default=True,
        metadata={
            "help": "feed a missingness flag per metadata feature to the model; false = the published "
            "model exactly (the reference code builds the flags but never feeds them)"
        },
    )
    eval_batch_size: int = field(default=128, metadata={"help": "records per batch during validation"})
    num_workers: int = field(
        default=0, metadata={"help": "DataLoader worker processes (0 = load in the main process)"}
    )
    num_threads: int = field(
        default=0, metadata={"help": "torch CPU threads per process (0 = all cores / processes)"}
    )
    max_steps_per_epoch: int = field(
        default=0, metadata={"help": "cap on optimisation steps per epoch (0 = no cap)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})

    def validate(self) -> None:
        """Raise ConfigError for values the types allow but the method does not."""
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
        if self.lr <= 0:
            raise ConfigError(f"config key 'lr' must be > 0, got {self.lr}")
        for key in ("weight_decay", "focal_gamma", "num_workers", "num_threads", "max_steps_per_epoch"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key '{key}' must be >= 0, got {getattr(self, key)}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ConfigError(
                f"config key 'tasks' must be a non-empty subset of {list(TASKS)}, got {list(self.tasks)}"
            )
        folds = {"val_fold": self.val_fold, "test_fold": self.test_fold}
        if self.val_fold == self.test_fold:
            raise ConfigError(f"config keys 'val_fold' and 'test_fold' must differ, both are {self.val_fold}")
        for key, fold in folds.items():
            if fold in self.train_folds:
                raise ConfigError(f"config key 'train_folds' contains the {key.split('_')[0]} fold {fold}")
        if not self.train_folds:
            raise ConfigError("config key 'train_folds' must not be empty")


@dataclass
class EvalConfig:
    """Settings of ``ecglab evaluate``: bootstrap, calibration, threshold rule, ECE bins, checkpoint."""

    checkpoint: Literal["best", "last"] = field(
        default="best", metadata={"help": "which checkpoint of the run"}
    )
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the CIs (0 = none)"})
    confidence: float = field(default=0.95, metadata={"help": "confidence level of the CIs"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap resampling"})
    threshold_rule: str = field(
        default="youden",
        metadata={
            "help": "decision threshold rule on the calibrated val fold: youden, sensitivity=X, ppv=X or f1"
        },
    )
    ece_bins: int = field(default=10, metadata={"help": "equal-width bins of the calibration error"})
    calibration: Literal["auto", "identity", "temperature", "platt", "isotonic"] = field(
        default="auto",
        metadata={
            "help": "per-target calibration fitted on the val fold: auto = the lowest cross-validated "
            "log-loss of temperature, platt and isotonic"
        },
    )
    isotonic_min_class: int = field(
        default=30,
        metadata={"help": "positives and negatives a target needs in the val fold before isotonic is tried"},
    )
    headline_auroc: float = field(
        default=0.70, metadata={"help": "AUROC criterion of the paper's headline counts"}
    )
    batch_size: int = field(default=128, metadata={"help": "records per inference batch"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = all cores)"})

    def validate(self) -> None:
        """Raise ConfigError for out-of-range values."""
        from model_training.thresholds import validate_threshold_rule

        if self.bootstrap < 0:
            raise ConfigError(f"config key 'bootstrap' must be >= 0, got {self.bootstrap}")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"config key 'confidence' must be in (0, 1), got {self.confidence}")
        if self.ece_bins < 1 or self.batch_size < 1 or self.isotonic_min_class < 1:
            raise ConfigError("config keys 'ece_bins', 'batch_size' and 'isotonic_min_class' must be >= 1")
        try:
            validate_threshold_rule(self.threshold_rule)
        except ValueError as exc:
            raise ConfigError(f"config key 'threshold_rule': {exc}") from exc


# --------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldInfo:
    """A leaf config key: dotted name, resolved type annotation, default and help text."""

    key: str
    type: Any
    default: Any
    help: str


def _hints(cls: type) -> dict[str, Any]:
    """Resolved type annotations of a dataclass (string annotations evaluated)."""
    return typing.get_type_hints(cls)


def iter_fields(cls: type, prefix: str = "", instance: Any = None) -> Iterator[FieldInfo]:
    """Yield every leaf key of dataclass ``cls`` (nested dataclasses flattened with dots)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if instance is not None:
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            yield from iter_fields(annotation, f"{prefix}{f.name}.", default)
        else:
            yield FieldInfo(f"{prefix}{f.name}", annotation, default, str(f.metadata.get("help", "")))


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-able nested dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# --------------------------------------------------------------------------------------------
# Typed value conversion
# --------------------------------------------------------------------------------------------
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _split_sequence(text: str) -> list[str]:
    """Items of '1,2,3', '[1, 2]' or '(a, b)' as stripped strings."""
    text = text.strip()
    if text[:1] in "[(" and text[-1:] in "])":
        text = text[1:-1]
    return [part.strip().strip("'\"") for part in text.split(",") if part.strip()]


def coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Convert ``value`` (a string from the command line, or a YAML/JSON value) to ``annotation``.

    Raises ConfigError naming ``key`` and ``source`` when the value does not fit the type.
    """

    def bad(expected: str) -> ConfigError:
        """The error for a value that does not fit the annotation."""
        return ConfigError(f"config key '{key}' ({source}): expected {expected}, got {value!r}")

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))
        ):
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner:
            try:
                return coerce(value, candidate, key, source)
            except ConfigError:
                continue
        raise bad(" or ".join(getattr(a, "__name__", str(a)) for a in inner))
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value.strip()):
                return choice
        raise bad(f"one of {list(args)}")
    if origin in (tuple, list):
        if isinstance(value, str):
            items: list[Any] = _split_sequence(value)
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise bad("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise bad(f"{len(args)} items")
            converted = [coerce(v, a, key, source) for v, a in zip(items, args, strict=True)]
        else:
            item_type = args[0] if args else str
            converted = [coerce(v, item_type, key, source) for v in items]
        return tuple(converted) if origin is tuple else converted
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("a boolean (true/false)")
    if annotation is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad("an integer") from None
        raise bad("an integer")
    if annotation is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad("a number") from None
        raise bad("a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    raise ConfigError(f"config key '{key}' ({source}): unsupported field type {annotation!r}")


# --------------------------------------------------------------------------------------------
# Building configs
# --------------------------------------------------------------------------------------------
def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping → {dotted key: value}; non-string keys are a ConfigError."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} is not a string")
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def apply_overrides(cfg: C, overrides: Mapping[str, Any], source: str = "command line") -> C:
    """Return a copy of ``cfg`` with dotted-key ``overrides`` applied (typed, unknown keys rejected).

    ``overrides`` may be flat (``{"model.d_model": "64"}``) or nested (``{"model": {...}}``).
    """
    leaves = {info.key: info for info in iter_fields(type(cfg), instance=cfg)}
    flat = _flatten(overrides)
    values = dataclasses.asdict(cfg)  # type: ignore[call-overload]
    for key, raw in flat.items():
        info = leaves.get(key)
        if info is None:
            known = ", ".join(sorted(leaves))
            raise ConfigError(f"unknown config key '{key}' ({source}); known keys: {known}")
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = coerce(raw, info.type, key, source)
    return from_dict(type(cfg), values, source)


def from_dict(cls: type[C], values: Mapping[str, Any], source: str = "config") -> C:
    """Build dataclass ``cls`` from a nested dict of already-typed values (e.g. a checkpoint)."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}' ({source}) for {cls.__name__}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{name}' ({source}): expected a mapping")
            kwargs[name] = from_dict(annotation, value, source)  # type: ignore[arg-type]
        else:
            kwargs[name] = coerce(value, annotation, name, source)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a config's own __post_init__ check (e.g. ModelConfig sizes)
        raise ConfigError(f"{source}: {exc}") from exc


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict; errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"config file {path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} ({exc})"
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of config keys")
    return data


def resolve(cls: type[C], config_file: Path | None, overrides: Mapping[str, Any]) -> C:
    """Defaults, then ``config_file``, then command-line ``overrides``; validated."""
    cfg = cls()
    if config_file is not None:
        cfg = apply_overrides(cfg, load_config_file(config_file), source=f"file {config_file}")
    cfg = apply_overrides(cfg, overrides, source="command line")
    cfg.validate()  # type: ignore[attr-defined]
    return cfg


# --------------------------------------------------------------------------------------------
# argparse integration
# --------------------------------------------------------------------------------------------
_OVERRIDE_PREFIX = "cfg__"


def _describe_type(annotation: Any) -> str:
    """Short metavar for --help: BEST|LAST, INT, A,B,..."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        return "A,B,..."
    return str(getattr(annotation, "__name__", annotation)).upper()


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, aliases: Mapping[str, list[str]] | None = None
) -> None:
    """Declare one ``--key=value`` option per config leaf of ``cls`` (plus hyphenated aliases).

    Values stay strings here and are converted by :func:`apply_overrides`, so a bad value gets
    the same clear ConfigError whether it came from a file or the command line. Abbreviated
    option names are switched off so that a typo is never silently matched to another key.
    """
    parser.allow_abbrev = False
    group = parser.add_argument_group("config overrides (--key=value; defaults = the paper's settings)")
    for info in iter_fields(cls):
        names = [f"--{info.key}"]
        if "_" in info.key:
            names.append(f"--{info.key.replace('_', '-')}")
        names.extend((aliases or {}).get(info.key, []))
        default = list(info.default) if isinstance(info.default, tuple) else info.default
        group.add_argument(
            *names,
            dest=_OVERRIDE_PREFIX + info.key,
            metavar=_describe_type(info.type),
            default=argparse.SUPPRESS,
            help=f"{info.help} (default: {default})" if info.help else f"(default: {default})",
        )


def overrides_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The ``--key=value`` overrides the user actually gave, as {dotted key: string}."""
    return {
        name[len(_OVERRIDE_PREFIX) :]: value
        for name, value in vars(args).items()
        if name.startswith(_OVERRIDE_PREFIX)
    }
