"""Configuration of the service: settings, the issuers file, ``ecglab serve`` and app startup.

Brief "Configuration": every setting has a default and an environment variable listed by
``ecglab serve --help``; a malformed value or file stops startup with a message naming the
variable or key.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cds_service.cli import main
from cds_service.issuers import load_issuers
from cds_service.settings import Settings, default_model_dir, describe_settings
from fhir_mappings.errors import ConfigError
from tests.service_fixtures import FakeRuntime

REQUIRED = {
    "ECGLAB_PUBLIC_URL",
    "ECGLAB_ISSUERS",
    "ECGLAB_AUTH",
    "ECGLAB_MODEL_DIR",
    "ECGLAB_DATABASE_URL",
    "ECGLAB_BUDGET_MS",
    "ECGLAB_HOST",
    "ECGLAB_PORT",
    "ECGLAB_WORKERS",
    "ECGLAB_FAIL_QUIET",
    "ECGLAB_DEV_FHIR_SERVERS",
    "ECGLAB_MAX_CARDS",
    "ECGLAB_RECENT_RESULT_MIN",
    "ECGLAB_INDICATOR_MAP",
    "ECGLAB_CORS_ORIGINS",
    "ECGLAB_LOG_LEVEL",
}


# -- settings ------------------------------------------------------------------------------------------------


def test_every_setting_has_an_env_var_a_default_and_help() -> None:
    """Brief: every setting has a default and an ECGLAB_* variable; the required ones all exist."""
    rows = describe_settings()
    names = [name for name, _, _ in rows]
    assert set(names) >= REQUIRED
    assert len(names) == len(set(names))
    assert all(name.startswith("ECGLAB_") and default and text for name, default, text in rows)


def test_defaults_are_the_documented_ones() -> None:
    """Brief defaults: auth on, budget 1500 ms, bundled models/ folder, SQLite file, fail-quiet off."""
    settings = Settings.from_env({"ECGLAB_AUTH": "off"})
    assert settings.budget_ms == 1500
    assert settings.model_dir == default_model_dir() == Path(__file__).resolve().parents[2] / "models"
    assert settings.database_url.startswith("sqlite:///")
    assert (settings.fail_quiet, settings.cors_origins, settings.port) == (False, (), 8080)
    assert Settings.__dataclass_fields__["auth"].default is True


def test_environment_values_are_parsed() -> None:
    """Values arrive as strings and are typed: integers, on/off, comma lists, URLs without trailing slash."""
    settings = Settings.from_env(
        {
            "ECGLAB_AUTH": "off",
            "ECGLAB_WORKERS": "3",
            "ECGLAB_FAIL_QUIET": "on",
            "ECGLAB_DEV_FHIR_SERVERS": "http://localhost:8091/fhir, https://fhir.example.org/r4",
            "ECGLAB_PUBLIC_URL": "https://cds.example.org/ecglab/",
        }
    )
    assert settings.workers == 3 and settings.fail_quiet is True
    assert settings.dev_fhir_servers == ("http://localhost:8091/fhir", "https://fhir.example.org/r4")
    assert settings.public_url == "https://cds.example.org/ecglab"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ECGLAB_BUDGET_MS", "fast"),
        ("ECGLAB_BUDGET_MS", "0"),
        ("ECGLAB_PORT", "70000"),
        ("ECGLAB_AUTH", "maybe"),
        ("ECGLAB_PUBLIC_URL", "cds.example.org"),
        ("ECGLAB_PUBLIC_URL", "https://cds.example.org/?x=1"),
        ("ECGLAB_DATABASE_URL", "mysql://db/ecglab"),
        ("ECGLAB_DEV_FHIR_SERVERS", "ftp://files.example.org"),
        ("ECGLAB_INDICATOR_MAP", "critical:warning"),
        ("ECGLAB_INDICATOR_MAP", "critical>=0.8:urgent;*>=0:info"),
        ("ECGLAB_INDICATOR_MAP", "critical>=0.8:warning"),
        ("ECGLAB_CORS_ORIGINS", "https://ehr.example.org/path"),
        ("ECGLAB_CORS_ORIGINS", "*"),  # any web page could call a service without auth
        ("ECGLAB_LOG_LEVEL", "LOUD"),
        ("ECGLAB_ORDER_INTENT", "original-order"),
    ],
)
def test_malformed_values_name_the_variable(variable: str, value: str) -> None:
    """Brief: a malformed value stops startup with a message naming the variable."""
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({"ECGLAB_AUTH": "off", variable: value})


def test_demo_page_needs_auth_off_and_a_dev_fhir_server() -> None:
    """ECGLAB_DEMO reads FHIR data without a user's token, so it is refused unless auth is off and a server is named."""
    with pytest.raises(ConfigError, match="ECGLAB_DEMO"):
        Settings.from_env({"ECGLAB_AUTH": "off", "ECGLAB_DEMO": "on"})
    settings = Settings.from_env(
        {"ECGLAB_AUTH": "off", "ECGLAB_DEMO": "on", "ECGLAB_DEV_FHIR_SERVERS": "http://127.0.0.1:8091/fhir"}
    )
    assert settings.demo is True


def test_demo_mode_registers_the_demo_page(tmp_path: Path) -> None:
    """With ECGLAB_DEMO=on the app serves /demo; without it the page does not exist."""
    from cds_service.app import create_app

    base = {"auth": False, "dev_fhir_servers": "http://127.0.0.1:8091/fhir", "database_url": "sqlite://"}
    with_page = create_app({**base, "demo": True}, runtime=FakeRuntime())
    without = create_app(base, runtime=FakeRuntime())
    assert any(rule.rule.startswith("/demo") for rule in with_page.url_map.iter_rules())
    assert not any(rule.rule.startswith("/demo") for rule in without.url_map.iter_rules())
    for app in (with_page, without):
        app.extensions["ecglab"].engine.dispose()


def test_unknown_setting_key_is_an_error() -> None:
    """A typo in a settings mapping must not silently fall back to a default."""
    with pytest.raises(ConfigError, match="budget_msec"):
        Settings.from_mapping({"auth": False, "budget_msec": 10})


def test_auth_on_needs_an_issuers_file(tmp_path: Path) -> None:
    """ECGLAB_AUTH is on by default, so ECGLAB_ISSUERS must name an existing file."""
    with pytest.raises(ConfigError, match="ECGLAB_ISSUERS"):
        Settings.from_env({})
    with pytest.raises(ConfigError, match="ECGLAB_ISSUERS"):
        Settings.from_env({"ECGLAB_ISSUERS": str(tmp_path / "missing.yaml")})


# -- the issuers file ------------------------------------------------------------------------------------------


GOOD_JWKS = '{"keys": [{"kty": "EC", "crv": "P-384", "kid": "k", "x": "AA", "y": "AA"}]}'


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("issuers: [a, b]\n", "exactly one top-level key 'issuers'"),
        ("servers: {}\n", "exactly one top-level key 'issuers'"),
        ("issuers: {}\n", "lists no issuers"),
        ('issuers:\n  "https://e.org":\n    jwks_uri: https://e.org/k\n', "unknown key(s) ['jwks_uri']"),
        ('issuers:\n  "https://e.org":\n    fhir_servers: ["https://f.org/"]\n', "needs a key source"),
        ('issuers:\n  "https://e.org":\n    jku_allow: "https://e.org/"\n', "jku_allow: expected a list"),
        (
            'issuers:\n  "https://e.org":\n    jku_allow: ["e.org/keys"]\n',
            "jku_allow: 'e.org/keys' is not an http(s) URL",
        ),
        (
            'issuers:\n  "https://e.org":\n    jwks_url: https://e.org/k\n    fhir_servers: [1]\n',
            "fhir_servers",
        ),
        (
            'issuers:\n  "https://e.org":\n    jwks_file: nowhere.json\n',
            "issuers.'https://e.org'.jwks_file: cannot read",
        ),
        ('issuers:\n  "https://e.org":\n    jwks_file: bad.json\n', "is not JSON"),
        ('issuers:\n  "https://e.org":\n    jwks_file: oct.json\n', "key type 'oct' is not allowed"),
        ('issuers:\n  "https://e.org":\n    jwks_file: private.json\n', "holds a private key"),
        (
            'issuers:\n  "https://e.org":\n    jwks_file: good.json\n    jwks_url: https://e.org/k\n',
            "not both",
        ),
        ("issuers: {a: [b\n", "not valid YAML"),
    ],
)
def test_issuers_file_errors_name_the_key(tmp_path: Path, content: str, expected: str) -> None:
    """Brief: a malformed issuers file stops startup with a message naming the key at fault."""
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "oct.json").write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k"}]}')
    (tmp_path / "private.json").write_text('{"keys": [{"kty": "EC", "crv": "P-384", "kid": "k", "d": "AA"}]}')
    (tmp_path / "good.json").write_text(GOOD_JWKS)
    path = tmp_path / "issuers.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_issuers(path)
    assert expected in str(error.value)


def test_relative_jwks_file_is_resolved_against_the_issuers_folder(tmp_path: Path) -> None:
    """Brief: a relative jwks_file is resolved against the issuers file's folder, not the working directory."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ehr.json").write_text(GOOD_JWKS)
    path = tmp_path / "issuers.yaml"
    path.write_text(
        'issuers:\n  "https://sandbox.cds-hooks.org":\n    jwks_file: keys/ehr.json\n'
        '    jku_allow: ["https://sandbox.cds-hooks.org/"]\n    fhir_servers: ["https://launch.smarthealthit.org/"]\n'
    )
    issuer = load_issuers(path)["https://sandbox.cds-hooks.org"]
    assert issuer.jwks_file == tmp_path / "keys" / "ehr.json"
    assert issuer.static_jwks is not None and issuer.static_jwks["keys"][0]["kid"] == "k"
    assert issuer.fhir_server_allowed("https://launch.smarthealthit.org/v/r4/fhir")
    assert not issuer.fhir_server_allowed("https://launch.smarthealthit.org.evil.net/fhir")


# -- ecglab serve ---------------------------------------------------------------------------------------------


def test_serve_help_lists_every_setting_with_default(capsys: pytest.CaptureFixture[str]) -> None:
    """Brief: 'ecglab serve --help' lists every setting with its default and environment variable."""
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for name, default, _ in describe_settings():
        assert name in text
        assert f"default: {default}" in text


def _serve_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **values: str) -> None:
    """A clean ECGLAB_* environment (auth off, SQLite in tmp) plus ``values``."""
    for name, _, _ in describe_settings():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ECGLAB_AUTH", "off")
    monkeypatch.setenv("ECGLAB_DATABASE_URL", f"sqlite:///{tmp_path / 'serve.sqlite3'}")
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_serve_check_reports_a_bad_setting_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Startup stops (exit 2) with one line naming the variable."""
    _serve_env(monkeypatch, tmp_path, ECGLAB_BUDGET_MS="fast")
    assert main(["serve", "--check"]) == 2
    assert "ECGLAB_BUDGET_MS" in capsys.readouterr().err


def test_serve_check_without_a_model_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model folder without a manifest stops startup with a message naming ECGLAB_MODEL_DIR or the export step."""
    _serve_env(monkeypatch, tmp_path, ECGLAB_MODEL_DIR=str(tmp_path / "no-models"))
    assert main(["serve", "--check"]) == 2
    assert "ECGLAB_MODEL_DIR" in capsys.readouterr().err


def test_serve_check_accepts_a_valid_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With settings, database and an intact manifest, --check validates and exits 0 without serving."""
    from tests.onnx_fixtures import build_toy_model_dir

    build_toy_model_dir(tmp_path / "models", version="0.0.7")
    _serve_env(monkeypatch, tmp_path, ECGLAB_MODEL_DIR=str(tmp_path / "models"))
    assert main(["serve", "--check", "--port", "9999"]) == 0
    assert "configuration OK (model 0.0.7" in capsys.readouterr().out
    assert (tmp_path / "serve.sqlite3").is_file()


# -- create_app startup ------------------------------------------------------------------------------------------


def test_create_app_loads_the_model_from_the_model_dir(tmp_path: Path) -> None:
    """Without an injected runtime, create_app loads the newest manifest of ECGLAB_MODEL_DIR (ModelRuntime)."""
    from cds_service.app import create_app
    from tests.onnx_fixtures import build_toy_model_dir

    build_toy_model_dir(tmp_path / "models", version="0.0.3")
    app = create_app(
        {
            "auth": False,
            "model_dir": str(tmp_path / "models"),
            "database_url": f"sqlite:///{tmp_path / 'a.sqlite3'}",
        }
    )
    health = app.test_client().get("/healthz").get_json()
    assert health["model"]["version"] == "0.0.3" and health["model"]["syntheticModel"] is True
    app.extensions["ecglab"].engine.dispose()


def test_create_app_without_a_model_stops_with_a_config_error(tmp_path: Path) -> None:
    """A model that cannot be loaded stops startup (ConfigError), it does not serve without one."""
    from cds_service.app import create_app

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="manifest"):
        create_app({"auth": False, "model_dir": str(tmp_path / "empty"), "database_url": "sqlite://"})


def test_create_app_reads_the_environment_when_given_no_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """create_app(None) takes its settings from the ECGLAB_* environment."""
    from cds_service.app import create_app

    _serve_env(monkeypatch, tmp_path, ECGLAB_MAX_CARDS="2")
    app = create_app(runtime=FakeRuntime())
    assert app.extensions["ecglab"].settings.max_cards == 2
    app.extensions["ecglab"].engine.dispose()


def test_auth_off_logs_a_loud_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Brief: ECGLAB_AUTH=off is for development only and says so loudly at startup."""
    from cds_service.app import create_app

    with caplog.at_level(logging.WARNING):
        app = create_app({"auth": False, "database_url": "sqlite://"}, runtime=FakeRuntime())
    [record] = [r for r in caplog.records if "AUTHENTICATION IS DISABLED" in r.getMessage()]
    assert record.levelno == logging.WARNING and "loopback FHIR servers only" in record.getMessage()
    app.extensions["ecglab"].engine.dispose()
