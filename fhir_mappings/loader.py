"""The mapping loader: read the three YAML files, validate them and check the rules across entries.

``features.yaml`` (model metadata inputs), ``labs.yaml`` (lab targets and their orders) and
``ecg.yaml`` (how an ECG is found and read) are read together by :func:`load_mappings`. Both
``model_training`` and ``cds_service`` call it, so a code, unit or window means the same thing on
both sides; the manifest stores :data:`MAPPING_VERSION` and the service refuses a model built
against another one.

Per-entry rules live with the models (``fhir_mappings.schema_*``); this module adds what only the
loader can know: which file and entry an error is in, YAML syntax errors and duplicate keys (with
their lines), uniqueness across entries, the model's feature order, and one version across the
three files. Every mistake raises :class:`MappingError` with a one-line message that names the
file, the entry and the field, e.g. ``labs.yaml: lab 'ntprobnp': field 'order_code.code': ...``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fhir_mappings.errors import ConfigError
from fhir_mappings.schema_common import FieldIssue
from fhir_mappings.schema_ecg import EcgFile
from fhir_mappings.schema_features import MODEL_FEATURES, FeaturesFile, FeatureSpec
from fhir_mappings.schema_labs import LabsFile, LabSpec
from fhir_mappings.schema_mappings import Mappings

#: Version of the packaged mapping files; every file's ``mapping_version`` must equal it when the
#: packaged directory is loaded. Bump it (and the files) whenever a code, unit, limit or window
#: changes, so that models exported with the old meaning are refused.
MAPPING_VERSION = "1.0.0"

#: The packaged mapping directory (this package's folder).
DEFAULT_DIR = Path(__file__).resolve().parent

FEATURES_FILE = "features.yaml"
LABS_FILE = "labs.yaml"
ECG_FILE = "ecg.yaml"

#: How an entry of a list section is named in messages: section -> (noun, identifying field).
_ENTRY_NOUNS: dict[str, tuple[str, str]] = {"features": ("feature", "key"), "labs": ("lab", "key")}


class MappingError(ConfigError):
    """A mapping file is missing, unreadable or breaks a rule; the message names file, entry and field.

    Attributes:
        file: the file name (e.g. ``labs.yaml``).
        entry: the entry, e.g. ``lab 'ntprobnp'`` or ``line 12``; ``None`` for file-level problems.
        field: the dotted field path, e.g. ``order_code.code``; ``None`` when no single field is at fault.
    """

    def __init__(self, file: str, entry: str | None, field: str | None, problem: str) -> None:
        parts = [file]
        if entry:
            parts.append(entry)
        if field:
            parts.append(f"field '{field}'")
        super().__init__(": ".join([*parts, problem]))
        self.file = file
        self.entry = entry
        self.field = field
        self.problem = problem


# -- locating an error inside a file ---------------------------------------------------------------


def _dotted(parts: Sequence[str | int]) -> str:
    """``('result_codes', 0, 'code')`` -> ``'result_codes[0].code'``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _describe(raw: Any, loc: Sequence[str | int]) -> tuple[str | None, str | None]:
    """Split a location inside a file into (entry description, field path) for messages.

    ``('labs', 3, 'order_code', 'code')`` becomes ``("lab 'ntprobnp'", "order_code.code")`` (the
    entry is named by its ``key``, falling back to its position); a location in a mapping section
    such as ``('lead_aliases', 'V1', 0)`` becomes ``("lead_aliases 'V1'", "[0]")``; a top-level
    field has no entry.
    """
    if not loc:
        return None, None
    section = str(loc[0])
    rest = list(loc[1:])
    if not rest:
        return None, section
    head = rest[0]
    container = raw.get(section) if isinstance(raw, Mapping) else None
    if isinstance(head, int):
        noun, id_field = _ENTRY_NOUNS.get(section, (section, "code"))
        item = container[head] if isinstance(container, list) and 0 <= head < len(container) else None
        ident = None
        if isinstance(item, Mapping):
            ident = item.get(id_field) or item.get("key") or item.get("code") or item.get("content_type")
        entry = f"{noun} '{ident}'" if ident is not None else f"{noun} #{head + 1}"
    elif isinstance(container, Mapping):
        entry = f"{section} '{head}'"
    else:
        return None, _dotted([section, *rest])
    field = _dotted(rest[1:]) or None
    return entry, field


def _from_validation_error(file: str, raw: Any, exc: ValidationError) -> MappingError:
    """The first pydantic error as a :class:`MappingError` (with a count of the others)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc: list[str | int] = [p for p in first["loc"] if isinstance(p, (str, int))]
    problem = str(first["msg"]).removeprefix("Value error, ")
    issue = (first.get("ctx") or {}).get("error")
    if isinstance(issue, FieldIssue):
        loc.extend(_split_path(issue.field))
        problem = issue.message
    elif first["type"] == "extra_forbidden":
        problem = "unknown key (not part of the mapping schema; check its spelling)"
    elif first["type"] == "missing":
        problem = "required field is missing"
    if len(errors) > 1:
        problem += f" (and {len(errors) - 1} more problem(s) in this file)"
    entry, field = _describe(raw, loc)
    return MappingError(file, entry, field, problem)


def _split_path(path: str) -> list[str | int]:
    """``'category_rules[2].category'`` -> ``['category_rules', 2, 'category']``."""
    parts: list[str | int] = []
    for piece in path.split("."):
        name, _, indexes = piece.partition("[")
        if name:
            parts.append(name)
        for index in filter(None, indexes.replace("]", "").split("[")):
            parts.append(int(index) if index.isdigit() else index)
    return parts


# -- reading YAML -----------------------------------------------------------------------------------


def _read_yaml(path: Path) -> tuple[Any, bytes]:
    """Parse one mapping file; syntax errors and duplicate keys become :class:`MappingError`."""
    name = path.name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MappingError(name, None, None, f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
        raw = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except UnicodeDecodeError as exc:
        raise MappingError(name, None, None, f"not UTF-8 text ({exc.reason})") from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = f"YAML syntax error: {exc.problem or exc.context}"
        raise MappingError(name, where, None, problem) from exc
    except yaml.YAMLError as exc:
        raise MappingError(name, None, None, f"YAML error: {exc}") from exc
    if node is not None:
        _check_duplicate_keys(name, raw, node, [])
    if not isinstance(raw, dict):
        raise MappingError(
            name, None, None, "the top level must be a mapping (mapping_version and the sections)"
        )
    return raw, data


def _check_duplicate_keys(name: str, raw: Any, node: yaml.Node, path: list[str | int]) -> None:
    """Refuse a key given twice in one YAML mapping (PyYAML would silently keep the last one)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                entry, field = _describe(raw, [*path, key])
                raise MappingError(
                    name,
                    entry,
                    field,
                    f"duplicate key '{key}' on line {line} (first on line {seen[key]}); each key may appear once",
                )
            seen[key] = line
            _check_duplicate_keys(name, raw, value_node, [*path, key])
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(name, raw, item, [*path, index])


def _validate(model: type[BaseModel], name: str, raw: Any) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _from_validation_error(name, raw, exc) from None


# -- rules across entries ---------------------------------------------------------------------------


def _check_features(features: Sequence[FeatureSpec]) -> None:
    """Feature keys are unique and follow the model's order, kinds and missing indicators."""
    seen: set[str] = set()
    for spec in features:
        if spec.key in seen:
            raise MappingError(
                FEATURES_FILE, f"feature '{spec.key}'", "key", "duplicate key; each feature appears once"
            )
        seen.add(spec.key)
    expected = [key for key, _, _ in MODEL_FEATURES]
    for position, (spec, (key, kind, indicator)) in enumerate(zip(features, MODEL_FEATURES, strict=False)):
        if spec.key != key:
            raise MappingError(
                FEATURES_FILE,
                f"feature '{spec.key}'",
                "key",
                f"position {position + 1} must be '{key}': features follow the model order {expected}",
            )
        if spec.kind != kind:
            raise MappingError(
                FEATURES_FILE, f"feature '{key}'", "kind", f"the model treats '{key}' as {kind}"
            )
        if spec.missing_indicator != indicator:
            state = "has" if indicator else "has no"
            raise MappingError(
                FEATURES_FILE,
                f"feature '{key}'",
                "missing_indicator",
                f"the model {state} a '{key}_missing' input",
            )
    if len(features) != len(MODEL_FEATURES):
        missing = expected[len(features) :] or None
        problem = f"missing {missing}" if missing else f"{len(features) - len(expected)} extra feature(s)"
        raise MappingError(
            FEATURES_FILE, None, "features", f"must list exactly the model inputs {expected}: {problem}"
        )
    owner: dict[tuple[str, str], str] = {}
    for spec in features:
        for index, coding in enumerate(spec.fhir.codes):
            token = (coding.system, coding.code)
            if token in owner and owner[token] != spec.key:
                raise MappingError(
                    FEATURES_FILE,
                    f"feature '{spec.key}'",
                    f"fhir.codes[{index}].code",
                    f"{coding.code} already feeds feature '{owner[token]}'",
                )
            owner[token] = spec.key


def _check_labs(labs: Sequence[LabSpec]) -> None:
    """Lab keys, MIMIC labels, result codes and order codes are each unique across labs."""
    keys: set[str] = set()
    labels: dict[str, str] = {}
    results: dict[tuple[str, str], str] = {}
    orders: dict[tuple[str, str], str] = {}
    for lab in labs:
        entry = f"lab '{lab.key}'"
        if lab.key in keys:
            raise MappingError(LABS_FILE, entry, "key", "duplicate key; each lab appears once")
        keys.add(lab.key)
        if lab.mimic_label in labels:
            raise MappingError(
                LABS_FILE,
                entry,
                "mimic_label",
                f"'{lab.mimic_label}' is already lab '{labels[lab.mimic_label]}'",
            )
        labels[lab.mimic_label] = lab.key
        for index, coding in enumerate(lab.result_codes):
            token = (coding.system, coding.code)
            if token in results:
                where = "this lab" if results[token] == lab.key else f"lab '{results[token]}'"
                raise MappingError(
                    LABS_FILE,
                    entry,
                    f"result_codes[{index}].code",
                    f"{coding.code} is already listed for {where}",
                )
            results[token] = lab.key
        token = (lab.order_code.system, lab.order_code.code)
        if token in orders:
            raise MappingError(
                LABS_FILE,
                entry,
                "order_code.code",
                f"{lab.order_code.code} already orders lab '{orders[token]}'; use the individual test's code",
            )
        orders[token] = lab.key


def _check_versions(versions: Mapping[str, str], expected: str | None) -> str:
    """All three files carry the same ``mapping_version`` (and the packaged one when loading the package)."""
    first_file, first = next(iter(versions.items()))
    for name, version in versions.items():
        if version != first:
            raise MappingError(
                name,
                None,
                "mapping_version",
                f"'{version}' differs from {first_file}'s '{first}'; the files form one version",
            )
        if expected is not None and version != expected:
            raise MappingError(
                name,
                None,
                "mapping_version",
                f"'{version}' is not the package's MAPPING_VERSION '{expected}'; bump both together",
            )
    return first


# -- loading ----------------------------------------------------------------------------------------


def _load(directory: Path, *, expected_version: str | None) -> Mappings:
    """Read, validate and cross-check the three files in ``directory``."""
    raw_features, bytes_features = _read_yaml(directory / FEATURES_FILE)
    raw_labs, bytes_labs = _read_yaml(directory / LABS_FILE)
    raw_ecg, bytes_ecg = _read_yaml(directory / ECG_FILE)
    features_file: FeaturesFile = _validate(FeaturesFile, FEATURES_FILE, raw_features)
    labs_file: LabsFile = _validate(LabsFile, LABS_FILE, raw_labs)
    ecg_file: EcgFile = _validate(EcgFile, ECG_FILE, raw_ecg)
    _check_features(features_file.features)
    _check_labs(labs_file.labs)
    version = _check_versions(
        {
            FEATURES_FILE: features_file.mapping_version,
            LABS_FILE: labs_file.mapping_version,
            ECG_FILE: ecg_file.mapping_version,
        },
        expected_version,
    )
    digest = hashlib.sha256()
    for name, content in ((FEATURES_FILE, bytes_features), (LABS_FILE, bytes_labs), (ECG_FILE, bytes_ecg)):
        digest.update(name.encode() + b"\0" + content + b"\0")
    return Mappings(
        version=version,
        digest=digest.hexdigest(),
        features=features_file.features,
        labs=labs_file.labs,
        ecg=ecg_file,
    )


@functools.lru_cache(maxsize=1)
def _load_default() -> Mappings:
    return _load(DEFAULT_DIR, expected_version=MAPPING_VERSION)


def load_mappings(directory: Path | None = None) -> Mappings:
    """Load and validate ``features.yaml``, ``labs.yaml`` and ``ecg.yaml``.

    Args:
        directory: folder holding the three files; ``None`` loads the packaged files (cached, and
            their version must equal :data:`MAPPING_VERSION`). A custom folder is read afresh
            on every call, so tests and sites can edit copies.

    Returns:
        The validated :class:`Mappings` (immutable).

    Raises:
        MappingError: a file is missing, not YAML, or breaks a rule; the message names the file,
            the entry and the field.
    """
    if directory is None:
        return _load_default()
    directory = Path(directory)
    if not directory.is_dir():
        raise MappingError(
            str(directory), None, None, "is not a directory holding features.yaml, labs.yaml and ecg.yaml"
        )
    return _load(directory, expected_version=None)
