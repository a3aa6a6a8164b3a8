"""Errors that end a command with a clear one-line message instead of a traceback.

Every ``ecglab`` subcommand raises :class:`InputError` for bad user input (a missing file, column,
folder, malformed value). The CLI prints ``ecglab <command>: error: <message>`` and exits with
status 2. The message must name the offending file, column or field.
"""

from __future__ import annotations


class EcglabError(Exception):
    """Base class of every error ecglab raises on purpose."""


class InputError(EcglabError):
    """Bad input given by the user: the message names the file, column or field at fault."""


class ConfigError(EcglabError):
    """A setting, environment variable or configuration file is malformed; names the setting."""
