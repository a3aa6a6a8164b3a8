"""Text generated from the code: the README's settings table and CLI reference, the Dockerfile's settings header.

``python -m tests.ops.test_readme --write`` (``make readme``) rewrites all of them; the tests in
``tests/ops/`` compare them with the code, so documentation cannot drift from what the service reads.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from cds_service.settings import describe_settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
HEADER_START = "# Environment variables (all optional; `ecglab serve --help` and the README list the same):"
HEADER_END = "#\n# Build from the repository root:"
WIDTH = 120


def dockerfile_settings_header() -> str:
    """The Dockerfile's comment block naming every setting, its default and meaning."""
    lines = [HEADER_START]
    for env, default, help_ in describe_settings():
        text = f"{help_} [default: {default}]"
        wrapped = textwrap.wrap(text, WIDTH - 36) or [""]
        lines.append(f"#   {env:<31}{wrapped[0]}")
        lines += [f"#   {'':<31}{more}" for more in wrapped[1:]]
    return "\n".join(lines) + "\n"


def dockerfile_header_in_file() -> str:
    """The settings block as it stands in the Dockerfile now."""
    text = DOCKERFILE.read_text()
    start = text.index(HEADER_START)
    return text[start : text.index(HEADER_END, start)]


def write_dockerfile_header() -> None:
    """Replace the Dockerfile's settings block with the generated one."""
    text = DOCKERFILE.read_text()
    DOCKERFILE.write_text(text.replace(dockerfile_header_in_file(), dockerfile_settings_header(), 1))
