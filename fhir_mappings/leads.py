"""The one lead-name resolver: how a source's lead name becomes a model lead, and with what sign.

ECG files name their leads in many spellings: ``"II"``, ``"Lead II"``, ``"lead_ii"``,
``"MDC_ECG_LEAD_II"``, ``"v1"``, European ``"DII"``/``"C1"`` (via aliases), and some display the
Cabrera limb sequence with the inverted lead ``"-aVR"``. Every reader, the training pipeline and
the service resolve names through :func:`canonical_lead` so a name means the same lead, with the
same polarity, everywhere.

Rules, in order:

1. **Prefix.** A leading ``Lead`` or ``MDC_ECG_LEAD`` (any case, any blanks, dots or underscores
   after it) is dropped. A dash glued to the prefix (``"Lead-II"``) is a separator; a dash after a
   blank (``"Lead -aVR"``) is a sign.
2. **Sign.** A leading ``-`` or ``−`` (U+2212), a leading word ``negative``/``inverted``/``neg``,
   or a trailing ``negative``/``inverted``/``neg`` (``"aVR inverted"``, ``"MDC_ECG_LEAD_AVRneg"``)
   marks the inverted lead: the match carries ``sign = -1.0`` and the caller multiplies the
   samples by it, so ``-aVR`` becomes ``aVR``.
3. **Normalisation.** Case, blanks, dots, dashes and underscores are ignored in what remains.
4. **Aliases** (model lead → other names, e.g. ``ecg.yaml``'s ``lead_aliases``) are tried first,
   normalised the same way; then the model spellings (:data:`MODEL_LEADS`).
5. **Never a neighbour.** Right-sided (``V3R``, ``V4R``, ...) and posterior (``V7``–``V9``) chest
   leads are different electrodes from V1–V6 and never resolve, whatever the aliases say.

Pure Python; imports only the contract.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from fhir_mappings.signal_spec import MODEL_LEADS

__all__ = ["LeadMatch", "canonical_lead", "lead_key"]


class LeadMatch(NamedTuple):
    """A resolved lead: the :data:`MODEL_LEADS` spelling and the factor (1.0 or -1.0) to apply."""

    lead: str
    sign: float


_SEPARATORS = re.compile(r"[\s_.\-]+")
_PREFIX = re.compile(r"(?:MDC[\s_.]*ECG[\s_.]*LEAD|LEAD)(?P<sep>[\s_.:]*)", re.IGNORECASE)
_SIGN_WORD = r"(?:negative|inverted|neg)"
_LEADING_WORD = re.compile(rf"{_SIGN_WORD}(?![a-z])[\s_.\-]*", re.IGNORECASE)
_TRAILING_WORD = re.compile(rf"[\s_.\-]*{_SIGN_WORD}$", re.IGNORECASE)
_NOT_STANDARD = re.compile(r"[VC]\d+R|[VC](?:[7-9]|1\d)|[VC]\d+[A-Z]+")
"""Keys of chest leads that are not V1–V6: right-sided (V3R…), posterior (V7–V9) and the like."""

_BUILTIN: dict[str, str] = {re.sub(_SEPARATORS, "", lead).upper(): lead for lead in MODEL_LEADS}


def _parse(name: str) -> tuple[float, str]:
    """Split a lead name into its sign and its normalised key (upper case, no separators)."""
    text = name.strip().replace("\u2212", "-")
    prefix = _PREFIX.match(text)
    if prefix:
        rest = text[prefix.end() :]
        if rest.startswith("-") and not prefix.group("sep"):
            rest = rest[1:]  # "Lead-II": the dash only separates the prefix
        text = rest.lstrip()
    sign = 1.0
    if text.startswith("-"):
        sign, text = -1.0, text[1:]
    elif leading := _LEADING_WORD.match(text):
        sign, text = -1.0, text[leading.end() :]
    if trailing := _TRAILING_WORD.search(text):
        sign, text = -sign, text[: trailing.start()]
    return sign, re.sub(_SEPARATORS, "", text).upper()


def lead_key(name: str) -> str:
    """The normalised key of a lead name, without prefix or sign (``"Lead -aVR"`` → ``"AVR"``)."""
    return _parse(name)[1]


def canonical_lead(name: str, aliases: Mapping[str, Sequence[str]] | None = None) -> LeadMatch | None:
    """Resolve a lead name to a model lead and its sign, or ``None`` when it is no model lead.

    Args:
        name: the lead name as the source spells it (``"Lead II"``, ``"-aVR"``, ``"v1"``).
        aliases: optional model lead → alternative names (``ecg.yaml``'s ``lead_aliases``); they
            are normalised like ``name`` and tried before the model spellings. Aliases of a lead
            that is not a model lead are ignored.

    Returns:
        ``LeadMatch(lead, sign)``: ``sign`` is ``-1.0`` for an inverted lead (``"-aVR"``), else
        ``1.0``. ``None`` for leads the model does not use (Frank X/Y/Z, V4R, V7, empty names).
    """
    sign, key = _parse(name)
    if not key or _NOT_STANDARD.fullmatch(key):
        return None
    if aliases:
        for lead, names in aliases.items():
            if lead not in MODEL_LEADS:
                continue
            for alias in names:
                alias_sign, alias_key = _parse(alias)
                if alias_key == key:
                    return LeadMatch(lead, sign * alias_sign)
    builtin = _BUILTIN.get(key)
    return LeadMatch(builtin, sign) if builtin is not None else None
