"""Pydantic models of ``ecg.yaml``: how an ECG is found on FHIR and read.

:class:`EcgSpec` lists the codes of ECG Observations, Media and DocumentReferences, the accepted
attachment types (:class:`AttachmentFormat`), the model's lead order with aliases, MDC lead codes
and derived limb leads, amplitude units and the limits (age, size, duration). Its validators keep
the lead section in step with the model (:data:`fhir_mappings.signal_spec.MODEL_LEADS`) and refuse
an alias that would resolve to two leads.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from fhir_mappings.leads import LeadMatch, canonical_lead, lead_key
from fhir_mappings.schema_common import MDC_SYSTEMS, Coding, FieldIssue, StrictModel, UnitConversion
from fhir_mappings.signal_spec import MODEL_LEADS
from fhir_mappings.tasks import MAX_WINDOW_END_MIN

#: ECG channel order of the model (CardioLab ``channel_stoi_default``; method §2.2).
MODEL_LEAD_ORDER: tuple[str, ...] = MODEL_LEADS


class AttachmentFormat(StrictModel):
    """An accepted ECG attachment ``contentType`` and the reader format it selects."""

    content_type: str
    format: Literal["dicom", "wfdb-zip", "muse-xml"]
    description: str = Field(min_length=1)

    @field_validator("content_type")
    @classmethod
    def _media_type(cls, value: str) -> str:
        if not re.match(r"^[a-z]+/[a-z0-9.+\-]+$", value):
            raise ValueError(f"{value!r} is not a lower-case media type such as 'application/dicom'")
        return value


class EcgSpec(StrictModel):
    """How an ECG is found on FHIR and read: codes, attachment types, leads and limits."""

    observation_codes: list[Coding] = Field(min_length=1)
    media_codes: list[Coding] = Field(min_length=1)
    document_codes: list[Coding] = Field(min_length=1)
    code_paths: dict[Literal["observation", "media", "documentreference"], list[str]]
    attachment_formats: list[AttachmentFormat] = Field(min_length=1)
    lead_order: list[str]
    lead_aliases: dict[str, list[str]]
    mdc_lead_codes: dict[str, Coding]
    derived_leads: dict[str, dict[str, float]] = Field(default_factory=dict)
    amplitude_unit: str
    amplitude_units: dict[str, UnitConversion]
    #: Oldest ECG used: by default the end of the longest task window (:mod:`fhir_mappings.tasks`),
    #: since an older ECG only supports claims about the past; a site may set it explicitly.
    max_age_minutes: int = Field(default=MAX_WINDOW_END_MIN, gt=0)
    max_attachment_bytes: int = Field(gt=0)
    min_duration_s: float = Field(gt=0)
    notes: str = ""

    _names: dict[str, tuple[str, ...]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> EcgSpec:
        self._check_leads()
        self._check_derived()
        identity = self.amplitude_units.get(self.amplitude_unit)
        if identity is None or identity.factor != 1 or identity.offset != 0:
            raise FieldIssue(
                "amplitude_units", f"must convert the canonical {self.amplitude_unit!r} with factor 1"
            )
        if set(self.code_paths) != {"observation", "media", "documentreference"}:
            raise FieldIssue(
                "code_paths", "must list the code fields of observation, media and documentreference"
            )
        self._names = self._check_names()
        return self

    def _check_leads(self) -> None:
        if tuple(self.lead_order) != MODEL_LEAD_ORDER:
            raise FieldIssue("lead_order", f"must be the model's lead order {list(MODEL_LEAD_ORDER)}")
        for section in ("lead_aliases", "mdc_lead_codes"):
            keys = set(getattr(self, section))
            if keys != set(self.lead_order):
                extra = sorted(keys - set(self.lead_order))
                missing = [lead for lead in self.lead_order if lead not in keys]
                raise FieldIssue(
                    section, f"must have exactly the model leads (missing {missing}, unknown {extra})"
                )
        for lead, coding in self.mdc_lead_codes.items():
            if coding.system not in MDC_SYSTEMS:
                raise FieldIssue(
                    f"mdc_lead_codes.{lead}.system", f"must be an IEEE 11073-10101 system {list(MDC_SYSTEMS)}"
                )
        for lead, names in self.lead_aliases.items():
            for index, alias in enumerate(names):
                if not alias.strip() or alias.strip()[0] in "+-":
                    raise FieldIssue(
                        f"lead_aliases.{lead}[{index}]",
                        f"{alias!r} is empty or signed; an inverted lead ('-aVR') is a different signal",
                    )

    def _check_derived(self) -> None:
        derived = set(self.derived_leads)
        for lead, weights in self.derived_leads.items():
            if lead not in self.lead_order:
                raise FieldIssue(f"derived_leads.{lead}", "is not a model lead")
            if not weights:
                raise FieldIssue(f"derived_leads.{lead}", "needs at least one source lead")
            for source in weights:
                if source not in self.lead_order or source in derived:
                    raise FieldIssue(
                        f"derived_leads.{lead}.{source}", "must be a measured (not derived) model lead"
                    )

    def _check_names(self) -> dict[str, tuple[str, ...]]:
        """Every other name of each lead (aliases, MDC code and reference ID), checked to resolve to it.

        Names are compared as :func:`fhir_mappings.leads.lead_key` compares them, so a name that
        would belong to two leads is refused here rather than resolving to whichever comes first;
        a name :func:`~fhir_mappings.leads.canonical_lead` would not give back as its own lead
        (inverted, or a right-sided/posterior chest lead such as V4R) is refused too.
        """
        names: list[tuple[str, str, str]] = [(lead, lead, f"lead_aliases.{lead}") for lead in self.lead_order]
        for lead, aliases in self.lead_aliases.items():
            names += [(alias, lead, f"lead_aliases.{lead}[{index}]") for index, alias in enumerate(aliases)]
        for lead, coding in self.mdc_lead_codes.items():
            names.append((coding.code, lead, f"mdc_lead_codes.{lead}.code"))
            names.append((coding.display, lead, f"mdc_lead_codes.{lead}.display"))
        owner: dict[str, str] = {}
        for name, lead, field in names:
            key = lead_key(name)
            other = owner.get(key)
            if other is not None and other != lead:
                raise FieldIssue(field, f"{name!r} would resolve to both {other!r} and {lead!r}")
            owner[key] = lead
        by_lead: dict[str, tuple[str, ...]] = {
            lead: tuple(name for name, owner_lead, _ in names if owner_lead == lead and name != lead)
            for lead in self.lead_order
        }
        for name, lead, field in names:
            if canonical_lead(name, by_lead) != LeadMatch(lead, 1.0):
                raise FieldIssue(
                    field, f"{name!r} does not resolve to {lead!r} (an inverted or non-standard lead name)"
                )
        return by_lead

    @property
    def content_types(self) -> list[str]:
        """The accepted attachment ``contentType`` values, in file order."""
        return [fmt.content_type for fmt in self.attachment_formats]

    def attachment_format(self, content_type: str | None) -> str | None:
        """The reader format for an attachment ``contentType`` (parameters and case ignored)."""
        if not content_type:
            return None
        bare = content_type.split(";", 1)[0].strip().lower()
        for fmt in self.attachment_formats:
            if fmt.content_type == bare:
                return fmt.format
        return None

    def resolve_lead(self, name: str | None) -> str | None:
        """The model lead a source lead name denotes, or ``None``.

        Resolves through :func:`fhir_mappings.leads.canonical_lead` with the file's aliases, MDC
        codes and reference IDs, so case, a ``Lead``/``MDC_ECG_LEAD`` prefix, blanks, dots, dashes
        and underscores are ignored. Signs are significant: ``'-aVR'`` (inverted aVR) is not aVR
        and gives ``None`` here; callers that can invert the samples use ``canonical_lead``.
        """
        if name is None:
            return None
        match = canonical_lead(str(name), self._names)
        return match.lead if match is not None and match.sign > 0 else None

    def lead_for_coding(self, system: str | None, code: str | None) -> str | None:
        """The model lead of a ``valueSampledData`` component coded with an MDC lead code."""
        for lead, coding in self.mdc_lead_codes.items():
            if coding.matches(system, code):
                return lead
        return None

    def to_millivolts(self, value: float, unit: str) -> float | None:
        """An amplitude in ``unit`` (UCUM, e.g. ``uV``) in millivolts; ``None`` for unknown units."""
        conversion = self.amplitude_units.get(unit.strip())
        return None if conversion is None else conversion.to_canonical(float(value))


class EcgFile(EcgSpec):
    """Top level of ``ecg.yaml``: the :class:`EcgSpec` fields plus the mapping version."""

    mapping_version: str
