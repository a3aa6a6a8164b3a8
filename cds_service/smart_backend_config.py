"""Settings of a SMART Backend Services client (the ``smart_backend`` entry of an issuer) and its key.

An issuer in the issuers file (:mod:`cds_service.issuers`) may name the client the service is
registered as at the FHIR server's authorization server::

    smart_backend:
      token_url: https://ehr.example.org/oauth2/token
      client_id: ecglab
      private_key_file: keys/ecglab-es384.pem     # relative to the issuers file's folder
      alg: ES384                                  # or RS384 (RSA, at least 2048 bits)
      scope: system/Patient.rs system/Observation.rs
      kid: optional key id                        # default: the RFC 7638 thumbprint of the key
      jwks_url: https://ecglab.example.org/jwks.json   # optional, sent as the ``jku`` header

:class:`SmartBackendConfig` checks all of it when built, so that a mistake stops start-up with a
:class:`ConfigError` naming the key rather than failing the first hook call: the URLs are
``https`` (plain ``http`` only on a loopback host) without credentials, query, fragment or dot
segments; the scope holds RFC 6749 scope tokens and no ``patient/`` or ``user/`` scopes; the PEM
file holds an unencrypted private key that fits ``alg`` (RSA of at least 2048 bits for RS384, EC
P-384 for ES384). :meth:`SmartBackendConfig.public_jwks` gives the JWKS to register or publish.

This module imports nothing from the rest of the service, so that :mod:`cds_service.issuers` can
use it to parse the issuers file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cds_service.url_rules import url_problem
from fhir_mappings.errors import ConfigError

ALGORITHMS: Final = ("RS384", "ES384")
CONFIG_KEYS: Final = frozenset(
    {"token_url", "client_id", "private_key_file", "alg", "scope", "kid", "jwks_url"}
)
REQUIRED_KEYS: Final = ("token_url", "client_id", "private_key_file", "alg", "scope")
MAX_KEY_FILE_BYTES: Final = 64 * 1024
MIN_RSA_BITS: Final = 2048

_PRINTABLE_ID = re.compile(r"[\x21-\x7e]{1,255}")
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3 scope-token

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
CacheKey = tuple[str, str, str]


@dataclass(frozen=True)
class SmartBackendConfig:
    """One backend client, validated at construction; the private key is loaded and checked then.

    ``kid`` left empty becomes the RFC 7638 thumbprint of the public key. ``where`` names the
    setting in error messages (e.g. ``issuers.yaml: issuers['https://ehr'].smart_backend``).
    """

    token_url: str
    client_id: str
    private_key_file: Path
    alg: str
    scope: str
    kid: str = ""
    jwks_url: str | None = None
    where: str = field(default="smart_backend", repr=False, compare=False)
    private_key: PrivateKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        w = self.where
        _check_url(self.token_url, f"{w}.token_url")
        if self.jwks_url is not None:
            _check_url(self.jwks_url, f"{w}.jwks_url")
        if not isinstance(self.client_id, str) or not _PRINTABLE_ID.fullmatch(self.client_id):
            raise ConfigError(f"{w}.client_id: expected 1-255 printable characters without spaces")
        if self.alg not in ALGORITHMS:
            raise ConfigError(f"{w}.alg: expected one of {', '.join(ALGORITHMS)}, got {self.alg!r}")
        object.__setattr__(self, "scope", _checked_scope(self.scope, f"{w}.scope"))
        if not isinstance(self.kid, str) or (self.kid and not _PRINTABLE_ID.fullmatch(self.kid)):
            raise ConfigError(f"{w}.kid: expected 1-255 printable characters without spaces")
        key = _load_private_key(Path(self.private_key_file), self.alg, f"{w}.private_key_file")
        object.__setattr__(self, "private_key", key)
        if not self.kid:
            object.__setattr__(self, "kid", jwk_thumbprint(key.public_key()))

    @classmethod
    def from_mapping(cls, entry: Any, *, base_dir: Path, where: str) -> SmartBackendConfig:
        """Build from an issuers-file ``smart_backend`` mapping; a relative key path resolves against ``base_dir``."""
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {sorted(CONFIG_KEYS)}")
        unknown = set(entry) - CONFIG_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {sorted(map(str, unknown))}; allowed: {sorted(CONFIG_KEYS)}"
            )
        for key in REQUIRED_KEYS:
            if key not in entry or entry[key] is None:
                raise ConfigError(f"{where}.{key}: required")
        for key in CONFIG_KEYS:
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise ConfigError(f"{where}.{key}: expected a string")
        key_file = Path(entry["private_key_file"])
        if not key_file.is_absolute():
            key_file = base_dir / key_file
        return cls(
            token_url=entry["token_url"],
            client_id=entry["client_id"],
            private_key_file=key_file,
            alg=entry["alg"],
            scope=entry["scope"],
            kid=entry.get("kid") or "",
            jwks_url=entry.get("jwks_url"),
            where=where,
        )

    @property
    def cache_key(self) -> CacheKey:
        """What a token is cached under: (token URL, client id, scope)."""
        return (self.token_url, self.client_id, self.scope)

    def public_jwk(self) -> dict[str, Any]:
        """The public key as a JWK (with ``kid``, ``alg``, ``use``), to register at the authorization server."""
        jwk = _public_jwk_members(self.private_key.public_key())
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk

    def public_jwks(self) -> dict[str, Any]:
        """``{"keys": [public_jwk]}``: the document to publish at ``jwks_url`` or hand to the EHR."""
        return {"keys": [self.public_jwk()]}


def _check_url(value: Any, where: str) -> None:
    """An acceptable configuration URL (:func:`cds_service.url_rules.url_problem`), else ConfigError."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a URL string")
    problem = url_problem(value)
    if problem is not None:
        raise ConfigError(f"{where}: {value!r} {problem}")


def _checked_scope(value: Any, where: str) -> str:
    """Space-separated RFC 6749 scope tokens, normalised to single spaces; no patient/ or user/ scopes."""
    if not isinstance(value, str) or len(value) > 4096:
        raise ConfigError(f"{where}: expected a string of at most 4096 characters")
    tokens = value.split()
    if not tokens:
        raise ConfigError(f"{where}: name at least one scope, e.g. 'system/Observation.rs'")
    for token in tokens:
        if not _SCOPE_TOKEN.fullmatch(token):
            raise ConfigError(f"{where}: {token!r} is not a valid OAuth scope")
        if token.startswith(("patient/", "user/")):
            raise ConfigError(f"{where}: {token!r}: backend services ask for system/ scopes only")
    return " ".join(tokens)


def _load_private_key(path: Path, alg: str, where: str) -> PrivateKey:
    """Read an unencrypted PEM private key and check that it fits ``alg`` (RSA ≥ 2048 bits, or EC P-384)."""
    try:
        if not path.is_file():
            raise ConfigError(f"{where}: {path} does not exist or is not a file")
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{where}: {path} is larger than a PEM private key can be")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path} ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{where}: {path} is encrypted; give an unencrypted PEM private key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{where}: {path} is not a PEM private key") from None
    if alg == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"{where}: alg RS384 needs an RSA private key; {path} holds {_kind(key)}")
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                f"{where}: the RSA key in {path} has {key.key_size} bits; at least {MIN_RSA_BITS}"
            )
        return key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ConfigError(f"{where}: alg ES384 needs an EC P-384 private key; {path} holds {_kind(key)}")
    return key


def _kind(key: object) -> str:
    """What kind of key ``key`` is, for error messages."""
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA key ({key.key_size} bits)"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC key on curve {key.curve.name}"
    return "a key of another type"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _public_jwk_members(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """The RFC 7638 required members of a public key's JWK (RSA: e, kty, n; EC: crv, kty, x, y)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        return {
            "e": _b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
            "kty": "RSA",
            "n": _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        }
    size = (public_key.curve.key_size + 7) // 8
    point = public_key.public_numbers()
    curve = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(public_key.curve.name)
    if curve is None:
        raise ValueError(f"curve {public_key.curve.name} has no JWK name")
    return {
        "crv": curve,
        "kty": "EC",
        "x": _b64url(point.x.to_bytes(size, "big")),
        "y": _b64url(point.y.to_bytes(size, "big")),
    }


def jwk_thumbprint(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): required members, sorted, no whitespace."""
    canonical = json.dumps(_public_jwk_members(public_key), sort_keys=True, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())
