"""README (issue: demo, docker and README): the two commands come first, and the generated
sections — the settings table and the CLI reference (and the Dockerfile's settings header) — match
the code exactly.

Regenerate them after changing a setting or a flag with ``python -m tests.ops.test_readme --write``
(``make readme``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path

from cds_service.cli import SUBCOMMANDS, main
from cds_service.settings import describe_settings
from tests.generated_docs import write_dockerfile_header

README = Path(__file__).resolve().parents[2] / "README.md"


def settings_table() -> str:
    rows = ["| Environment variable | Default | Meaning |", "|---|---|---|"]
    for env, default, help_ in describe_settings():
        meaning = help_.replace("|", "\\|")
        rows.append(f"| `{env}` | `{default}` | {meaning} |")
    return "\n".join(rows)


def _help(argv: list[str]) -> str:
    """The help text at a fixed width (argparse wraps to $COLUMNS)."""
    buffer = io.StringIO()
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            main(argv)
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return buffer.getvalue().rstrip()


def cli_reference() -> str:
    parts = [
        "Generated from `ecglab --help` and `ecglab COMMAND --help`.",
        "",
        "```text",
        _help(["--help"]),
        "```",
    ]
    for command in SUBCOMMANDS:
        parts += ["", f"### `ecglab {command.name}`", "", "```text", _help([command.name, "--help"]), "```"]
    return "\n".join(parts)


def _section(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"README lacks the {name} markers"
    return match.group(1).strip()


def _replace(text: str, name: str, body: str) -> str:
    return re.sub(
        rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)",
        lambda m: f"{m.group(1)}{body}\n{m.group(2)}",
        text,
        flags=re.S,
    )


def test_readme_starts_with_the_two_commands() -> None:
    head = README.read_text().splitlines()[:8]
    assert any(line.startswith("make demo") for line in head)
    assert any(line.startswith("make test") for line in head)


def test_readme_settings_table_matches_the_code() -> None:
    assert _section(README.read_text(), "settings-table") == settings_table(), (
        "run: python -m tests.ops.test_readme --write"
    )


def test_readme_cli_reference_matches_ecglab_help() -> None:
    assert _section(README.read_text(), "cli-reference") == cli_reference(), (
        "run: python -m tests.ops.test_readme --write"
    )


def test_readme_says_the_bundled_model_is_not_for_clinical_use() -> None:
    text = README.read_text()
    assert "not for clinical use" in text.lower() and "synthetic" in text


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.ops.test_readme --write")
    text = README.read_text()
    text = _replace(text, "settings-table", settings_table())
    text = _replace(text, "cli-reference", cli_reference())
    README.write_text(text)
    write_dockerfile_header()
