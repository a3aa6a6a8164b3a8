"""Shadow mode and kill switch (cds_service.controls): file format, reloads, fail-closed, filters."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from cds_service.controls import Controls, ControlState, known_names, parse_controls
from fhir_mappings.errors import ConfigError
from fhir_mappings.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]
LABS = {"potassium", "troponin_t", "creatinine"}
TARGETS = {"Potassium_high_est", "Potassium_high_mon30", "Creatinine_low_est", "Troponin T_high_mon60"}


@dataclass(frozen=True)
class Pred:
    target: str
    lab_key: str


@dataclass(frozen=True)
class Card:
    lab_key: str


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str, bump: int) -> None:
    """Write ``text`` and give the file a distinct mtime (filesystems with coarse timestamps)."""
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump * 1_000_000_000))


def controls(path: Path, clock: Clock) -> Controls:
    return Controls(path, known_labs=LABS, known_targets=TARGETS, clock=clock)


def test_file_format_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "controls.yaml"
    write(path, "mode: shadow\ndisabled_labs: [troponin_t]\ndisabled_targets:\n  - Potassium_high_mon30\n", 1)
    state = controls(path, Clock()).current()
    assert state.mode == "shadow" and state.runs_model and not state.returns_cards
    assert state.disabled_labs == {"troponin_t"} and state.disabled_targets == {"Potassium_high_mon30"}
    assert Controls(None).current() == ControlState()
    assert Controls(None, default_mode="off").current().mode == "off"
    write(path, "", 2)
    assert controls(path, Clock()).current().mode == "live"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mdoe: live\n", r"unknown key\(s\) \['mdoe'\]"),
        ("mode: dark\n", "mode: expected one of live, shadow, off"),
        ("disabled_labs: potassium\n", "disabled_labs: expected a list of names"),
        ("disabled_labs: [sodium]\n", r"disabled_labs: unknown \['sodium'\]"),
        ("disabled_targets: [Potassium_low_mon120]\n", "disabled_targets: unknown"),
        ("- live\n", "expected a mapping"),
        ("mode: [\n", "not valid YAML"),
    ],
)
def test_invalid_files_stop_startup_with_the_key_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "controls.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        controls(path, Clock())


def test_reload_on_change_at_most_once_per_second(tmp_path: Path) -> None:
    path, clock = tmp_path / "controls.yaml", Clock()
    write(path, "mode: shadow\n", 1)
    ctl = controls(path, clock)
    assert ctl.current().mode == "shadow"
    write(path, "mode: live\n", 2)
    clock.now += 0.5
    assert ctl.current().mode == "shadow"  # not checked yet
    clock.now += 0.6
    assert ctl.current().mode == "live"
    write(path, "mode: off\n", 3)
    clock.now += 0.2
    assert ctl.current().mode == "live"
    clock.now += 1.0
    assert ctl.current().mode == "off" and not ctl.current().runs_model


def test_broken_or_deleted_file_fails_closed_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, clock = tmp_path / "controls.yaml", Clock()
    write(path, "mode: live\n", 1)
    ctl = controls(path, clock)
    write(path, "mode: liev\n", 2)
    with caplog.at_level(logging.ERROR, logger="cds_service.controls"):
        for _ in range(3):
            clock.now += 1.5
            state = ctl.current()
    assert state.mode == "off" and state.error is not None and "liev" in state.error
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # logged once
    write(path, "mode: shadow\n", 3)
    clock.now += 1.5
    assert ctl.current() == ControlState(mode="shadow", source=str(path))
    path.unlink()
    clock.now += 1.5
    assert ctl.current().mode == "off" and "cannot be read" in str(ctl.current().error)
    path.write_text("mode: live\n")
    clock.now += 1.5
    assert ctl.current().mode == "live" and ctl.current().error is None


def test_filters() -> None:
    state = parse_controls(
        {"mode": "live", "disabled_labs": ["troponin_t"], "disabled_targets": ["Potassium_high_mon30"]},
        source="t",
    )
    preds = [
        Pred("Potassium_high_est", "potassium"),
        Pred("Potassium_high_mon30", "potassium"),
        Pred("Troponin T_high_mon60", "troponin_t"),
    ]
    assert state.filter_predictions(preds) == [preds[0]]
    cards = [Card("potassium"), Card("troponin_t"), Card("creatinine")]
    assert state.filter_cards(cards) == [cards[0], cards[2]]
    assert state.response_cards(cards) == [cards[0], cards[2]]
    shadow = parse_controls({"mode": "shadow", "disabled_labs": ["troponin_t"]}, source="t")
    assert shadow.filter_cards(cards) == [cards[0], cards[2]]  # what is audited
    assert shadow.response_cards(cards) == []  # what the EHR gets
    assert parse_controls({"mode": "off"}, source="t").response_cards(cards) == []
    assert state.describe()["disabled_labs"] == ["troponin_t"]


def test_known_names_from_the_manifest() -> None:
    manifest = load_manifest(ROOT / "models" / "ecglab-0.2.0-demo.manifest.json", verify_file=False)
    labs, targets = known_names(manifest.labels)
    assert "potassium" in labs and "Potassium_high_mon30" in targets and len(targets) == len(manifest.labels)


def test_concurrent_readers_see_whole_states(tmp_path: Path) -> None:
    path = tmp_path / "controls.yaml"
    write(path, "mode: live\n", 1)
    ctl = Controls(path, check_interval_s=0.0)
    seen: list[ControlState] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(300):
                seen.append(ctl.current())
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for i in range(30):
        write(path, "mode: shadow\ndisabled_labs: [a, b]\n" if i % 2 else "mode: live\n", i + 2)
    for thread in threads:
        thread.join()
    assert not errors
    # a reader may catch a half-written file: that reads as a shorter file or, when invalid, as "off"
    valid = {
        ("live", frozenset()),
        ("shadow", frozenset()),
        ("shadow", frozenset({"a", "b"})),
        ("off", frozenset()),
    }
    assert {(s.mode, s.disabled_labs) for s in seen} <= valid
