"""What only the deploying site knows about the intervention: the site-editable half of the model card.

The model card (:mod:`cds_service.model_card`) is built from the model manifest, the evaluation
metrics, the project's own statements and this file, a small YAML document the deployer keeps next
to the service (``ECGLAB_SITE_INFO``; ``models/site-info.example.yaml`` lists every field with a
comment). Every field is optional: what the site has not stated is shown on the card as "not
stated by the deployer", never invented. Unknown keys are an error naming the key, so a typo
cannot silently drop a statement from the card.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from fhir_mappings.errors import ConfigError


class _Site(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Contact(_Site):
    """A person or team to contact, with any of email, phone and web page."""

    name: str | None = None
    email: str | None = None
    phone: str | None = None
    url: str | None = None

    def text(self) -> str | None:
        """One line naming every stated part, or ``None`` when nothing is stated."""
        parts = [p for p in (self.name, self.email, self.phone, self.url) if p]
        return ", ".join(parts) if parts else None


class Organisation(_Site):
    """The deploying organisation and the people responsible for the service there."""

    name: str | None = None
    department: str | None = None
    contact: Contact = Contact()


class Developer(_Site):
    """The intervention's developer as the site knows it (e.g. the team that trained the deployed model)."""

    name: str | None = None
    contact: Contact = Contact()


class Deployment(_Site):
    """Where and how the service runs at the site."""

    setting: str | None = None
    ehr: str | None = None
    intended_users: str | None = None
    go_live: str | None = None
    how_to_use: str | None = None


class ExternalValidation(_Site):
    """An external validation of the deployed model, if one was done (HTI-1 group 6, 7(iii)-(iv))."""

    data_source: str | None = None
    party: str | None = None
    demographics: str | None = None
    process: str | None = None
    validity: str | None = None
    fairness: str | None = None


class LocalValidation(_Site):
    """How the site monitors validity and fairness on its own patients (HTI-1 group 8)."""

    validity_process: str | None = None
    validity_frequency: str | None = None
    fairness_process: str | None = None
    fairness_frequency: str | None = None
    validity_results: str | None = None
    fairness_results: str | None = None


class UpdateSchedule(_Site):
    """How and how often the deployed model is updated or corrected (HTI-1 group 9)."""

    update_process: str | None = None
    update_frequency: str | None = None
    correction_process: str | None = None


class SiteInfo(_Site):
    """The whole site file; see ``models/site-info.example.yaml``."""

    organisation: Organisation = Organisation()
    developer: Developer = Developer()
    funding: str | None = None
    deployment: Deployment = Deployment()
    external_validation: ExternalValidation = ExternalValidation()
    local_validation: LocalValidation = LocalValidation()
    update_schedule: UpdateSchedule = UpdateSchedule()
    outcome_evaluations: list[str] = []
    stakeholders_consulted: str | None = None
    regulatory_status: str | None = None
    patient_disclosure: str | None = None


def load_site_info(path: Path | None) -> SiteInfo:
    """The site file at ``path`` (``None`` = nothing stated); :class:`ConfigError` names the problem."""
    if path is None:
        return SiteInfo()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"ECGLAB_SITE_INFO: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"ECGLAB_SITE_INFO: {path} cannot be read ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"ECGLAB_SITE_INFO: {path} is not valid YAML ({exc})") from None
    if raw is None:
        return SiteInfo()
    try:
        return SiteInfo.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"ECGLAB_SITE_INFO: {path}: field '{where}': {first['msg']}") from None
