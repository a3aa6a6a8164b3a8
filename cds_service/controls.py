"""Shadow mode and kill switch: what the service may show, changeable without a redeploy.

A hospital switches a predictive service on in stages: first *shadow* (everything runs and is
audited, the EHR receives no cards), then *live*; and it must be able to switch a lab, a single
target or the whole service off at once when something looks wrong. These switches live in a
small YAML file that the service re-reads when it changes, so an operator edits one file and the
next hook call obeys it; no restart, no admin endpoint that could be misused.

File format (every key optional)::

    # ecglab controls file (ECGLAB_CONTROLS)
    mode: live                      # live | shadow | off
    disabled_labs: [troponin_t]     # lab keys of fhir_mappings/labs.yaml: no card for these labs
    disabled_targets:               # single model outputs (manifest label targets) to ignore
      - Potassium_high_mon30

* ``live``: cards are returned to the EHR (minus disabled labs and targets);
* ``shadow``: the model runs and the call is audited with the cards it *would* have returned, but
  the EHR receives ``{"cards": []}``;
* ``off``: the model is not run at all and the EHR receives no cards.

An empty file, or no file at all, means ``live`` with nothing disabled. Unknown keys, a wrong
type, an unknown mode, lab or target are errors naming the key (at start-up the service refuses
to start; see below for a file that breaks later).

Reloading: :meth:`Controls.current` checks the file's modification time at most once per second
(``check_interval_s``) and re-reads it when the time or size changed; the check and the reload are
serialised by a lock, so concurrent request threads see one consistent :class:`ControlState`.
**A file that becomes unreadable or invalid while the service runs switches the service off**
(fail closed: no model advice is the safe default) and logs the error once; fixing the file
restores the state it then describes. :attr:`ControlState.error` carries the reason, for health
checks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import yaml

from fhir_mappings.errors import ConfigError

log = logging.getLogger(__name__)

Mode = Literal["live", "shadow", "off"]
MODES: tuple[str, ...] = ("live", "shadow", "off")
KEYS: tuple[str, ...] = ("mode", "disabled_labs", "disabled_targets")


class _HasLab(Protocol):
    """Anything tied to one lab (a built card, an issued-card row)."""

    @property
    def lab_key(self) -> str: ...


class _HasTarget(Protocol):
    """Anything tied to one model output (a target prediction)."""

    @property
    def target(self) -> str: ...

    @property
    def lab_key(self) -> str: ...


LabT = TypeVar("LabT", bound=_HasLab)
TargetT = TypeVar("TargetT", bound=_HasTarget)


@dataclass(frozen=True)
class ControlState:
    """One consistent reading of the controls file."""

    mode: Mode = "live"
    disabled_labs: frozenset[str] = frozenset()
    disabled_targets: frozenset[str] = frozenset()
    source: str = "(defaults)"
    error: str | None = None

    @property
    def runs_model(self) -> bool:
        """Whether the model runs at all (``live`` or ``shadow``)."""
        return self.mode != "off"

    @property
    def returns_cards(self) -> bool:
        """Whether the EHR receives cards (``live`` only)."""
        return self.mode == "live"

    def allows_lab(self, lab_key: str) -> bool:
        """Whether cards for ``lab_key`` may be built."""
        return lab_key not in self.disabled_labs

    def allows_target(self, target: str, lab_key: str | None = None) -> bool:
        """Whether the output ``target`` (of lab ``lab_key``) may contribute to a card."""
        return target not in self.disabled_targets and (lab_key is None or self.allows_lab(lab_key))

    def filter_predictions(self, predictions: Iterable[TargetT]) -> list[TargetT]:
        """The predictions whose target and lab are enabled (before cards are built)."""
        return [p for p in predictions if self.allows_target(p.target, p.lab_key)]

    def filter_cards(self, cards: Iterable[LabT]) -> list[LabT]:
        """The cards whose lab is enabled: what the call would answer in ``live`` mode (and audits)."""
        return [c for c in cards if self.allows_lab(c.lab_key)]

    def response_cards(self, cards: Iterable[LabT]) -> list[LabT]:
        """What the EHR receives: the enabled cards in ``live`` mode, nothing in ``shadow``/``off``."""
        return self.filter_cards(cards) if self.returns_cards else []

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (for /healthz or a log line)."""
        return {
            "mode": self.mode,
            "disabled_labs": sorted(self.disabled_labs),
            "disabled_targets": sorted(self.disabled_targets),
            "source": self.source,
            "error": self.error,
        }


def parse_controls(
    raw: Any,
    *,
    source: str,
    known_labs: Collection[str] | None = None,
    known_targets: Collection[str] | None = None,
) -> ControlState:
    """Validate the YAML document ``raw``; :class:`ConfigError` names ``source`` and the key at fault."""
    if raw is None:
        return ControlState(source=source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with keys {', '.join(KEYS)}")
    unknown = sorted(str(k) for k in raw if k not in KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
    mode = raw.get("mode", "live")
    if mode not in MODES:
        raise ConfigError(f"{source}: mode: expected one of {', '.join(MODES)}, got {mode!r}")
    labs = _names(raw.get("disabled_labs"), f"{source}: disabled_labs", known_labs)
    targets = _names(raw.get("disabled_targets"), f"{source}: disabled_targets", known_targets)
    return ControlState(mode=mode, disabled_labs=labs, disabled_targets=targets, source=source)


def _names(value: Any, where: str, known: Collection[str] | None) -> frozenset[str]:
    """A list of strings (``None`` = empty), each in ``known`` when that is given."""
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}: expected a list of names")
    names = frozenset(v.strip() for v in value)
    if known is not None:
        strangers = sorted(names - set(known))
        if strangers:
            sample = ", ".join(sorted(known)[:8])
            raise ConfigError(f"{where}: unknown {strangers} (known, e.g.: {sample}, …)")
    return names


class Controls:
    """The controls file, re-read when it changes; see the module docstring.

    ``Controls(None)`` (no file configured) always answers the defaults, or ``default_mode``.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        known_labs: Collection[str] | None = None,
        known_targets: Collection[str] | None = None,
        default_mode: Mode = "live",
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if default_mode not in MODES:
            raise ConfigError(
                f"controls: default mode must be one of {', '.join(MODES)}, got {default_mode!r}"
            )
        self.path = path
        self._known_labs = known_labs
        self._known_targets = known_targets
        self._default = ControlState(mode=default_mode)
        self._interval = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked_at = -float("inf")
        self._state = self._default
        if path is not None:
            self._state = self._load()  # raises ConfigError: a bad file at start-up stops the service

    def current(self) -> ControlState:
        """The state to apply now (re-reading the file when due and changed)."""
        if self.path is None:
            return self._state
        with self._lock:
            now = self._clock()
            if now - self._checked_at >= self._interval:
                self._checked_at = now
                self._refresh()
            return self._state

    def _refresh(self) -> None:
        """Reload when the file's (mtime, size) changed; fail closed on any error."""
        assert self.path is not None
        try:
            stat = self.path.stat()
        except OSError as exc:
            self._stamp = None  # a file put back later is read whatever its mtime
            self._fail(f"{self.path}: cannot be read ({exc.strerror or exc})")
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            state = self._load()
        except ConfigError as exc:
            self._stamp = stamp
            self._fail(str(exc))
            return
        if state != self._state:
            log.warning("controls changed: %s", state.describe())
        self._state = state

    def _fail(self, reason: str) -> None:
        """Switch off (fail closed), logging the reason once per distinct reason."""
        if self._state.error != reason:
            log.error("controls file unusable, service switched off until it is fixed: %s", reason)
        self._state = ControlState(mode="off", source=str(self.path), error=reason)

    def _load(self) -> ControlState:
        """Read and validate the file, remembering its (mtime, size)."""
        assert self.path is not None
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path}: cannot be read ({exc})") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.path}: not valid YAML ({exc})") from None
        state = parse_controls(
            raw, source=str(self.path), known_labs=self._known_labs, known_targets=self._known_targets
        )
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return state


def known_names(labels: Sequence[Any]) -> tuple[set[str], set[str]]:
    """(lab keys, targets) named by a manifest's labels, for validating the controls file."""
    labs = {str(label.lab_key) for label in labels if getattr(label, "lab_key", None)}
    targets = {str(label.target) for label in labels}
    return labs, targets
