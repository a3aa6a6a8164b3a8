"""The card-preview page in a real browser: headless Chromium against the live demo app.

The app is the real service with the ``/demo`` blueprint (``tests/browser.py``: auth off,
MockFhir, a per-patient model double) on a loopback port. Pinned: cards are drawn as the CDS
Hooks Sandbox draws them (cdshooks.md §5, §9.1: summary title, indicator colour, source label,
Markdown detail, suggestion button showing the draft ServiceRequest, override reasons); the
no-cards, service-error and FHIR-down states are visible; the Markdown renderer escapes HTML.
A screenshot of the main flow goes to ``test-artifacts/demo-page.png``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import LiveServer, build_demo_app, chrome, demo_world, dispose_app  # noqa: F401
from tests.service_fixtures import MockFhir

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
WAIT_S = 10


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    app, _ = build_demo_app(tmp_path_factory.mktemp("demo-live"), demo_world())
    server = LiveServer.start(app)
    yield server
    server.stop()
    dispose_app(app)


def _state(driver: Any) -> str:
    return str(driver.find_element("tag name", "body").get_attribute("data-state"))


def _wait_state(driver: Any, *states: str) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(lambda d: _state(d) in states)
    return _state(driver)


def _open(driver: Any, url: str) -> None:
    driver.get(url)
    _wait_state(driver, "ready", "error")


def _pick(driver: Any, patient: str, hook: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", "patient")).select_by_value(patient)
    _wait_state(driver, "inputs-ready", "error")
    Select(driver.find_element("id", "hook")).select_by_value(hook)


def _fire(driver: Any) -> str:
    driver.find_element("id", "fire").click()
    return _wait_state(driver, "cards", "no-cards", "service-error", "error")


def test_cards_render_like_the_sandbox_and_the_suggestion_shows_its_service_request(
    chrome: Any,  # noqa: F811
    live: LiveServer,
) -> None:
    """Pick a patient and a hook, fire, read the cards, open the suggestion; screenshot it all."""
    _open(chrome, f"{live.url}/demo")
    assert chrome.current_url.endswith("/demo/")
    options = [o.text for o in chrome.find_elements("css selector", "#patient option")]
    assert any(o.startswith("Ada Quinn") for o in options)

    _pick(chrome, "pat-ada", "order-select")
    canvas = chrome.find_element("id", "ecg")
    assert canvas.get_attribute("data-leads") == "12"
    assert 0 < int(canvas.get_attribute("data-points")) <= 500
    heart_rate = chrome.find_element("css selector", '#features tr[data-key="heart_rate"]')
    assert "112.0 /min" in heart_rate.text and "Observation/hr-ada" in heart_rate.text

    assert _fire(chrome) == "cards"
    cards = chrome.find_elements("css selector", "#cards article.card")
    by_indicator = {c.get_attribute("data-indicator"): c for c in cards}
    assert set(by_indicator) == {"critical", "warning", "info"}
    critical = by_indicator["critical"]
    assert "indicator-critical" in critical.get_attribute("class").split()
    summary = critical.find_element("css selector", ".card-summary").text
    clock = r"(\d{1,2} [A-Z][a-z]{2} )?\d\d:\d\d"  # the day only when it is not today
    assert re.fullmatch(
        rf"\[DEMO\] Consider Potassium: likely abnormally high around the time of the ECG "
        rf"\({clock}–{clock} UTC; ECG at {clock}, \d+ min ago\)",
        summary,
    ), summary
    assert "ecglab ECG lab model" in critical.find_element("css selector", ".card-source").text
    detail = critical.find_element("css selector", ".card-detail")
    assert detail.find_elements("css selector", "table td")  # the Markdown table was rendered
    assert detail.find_element("css selector", "strong").text == "Demo model — not for clinical use."
    reasons = [li.text for li in critical.find_elements("css selector", ".override-reasons li")]
    assert "Not clinically indicated" in reasons

    colours = {name: card.value_of_css_property("border-left-color") for name, card in by_indicator.items()}
    assert len(set(colours.values())) == 3, colours

    preview = critical.find_element("css selector", ".suggestion-preview")
    assert not preview.is_displayed()
    critical.find_element("css selector", "button.suggestion").click()
    assert preview.is_displayed()
    resource = json.loads(preview.find_element("css selector", ".suggestion-resource").text)
    assert resource["resourceType"] == "ServiceRequest" and resource["status"] == "draft"
    assert resource["code"]["coding"][0]["code"] == "2823-3"
    assert resource["subject"] == {"reference": "Patient/pat-ada"}

    request_box = chrome.find_element("id", "request-box")
    assert request_box.get_attribute("open") is None  # collapsed until clicked
    sent = json.loads(chrome.find_element("id", "request-json").get_attribute("textContent"))
    assert sent["hook"] == "order-select" and sent["context"]["patientId"] == "pat-ada"

    ARTIFACTS.mkdir(exist_ok=True)
    height = chrome.execute_script("return document.documentElement.scrollHeight")
    chrome.set_window_size(1440, min(int(height) + 140, 4000))
    assert chrome.save_screenshot(str(ARTIFACTS / "demo-page.png"))
    chrome.set_window_size(1440, 1000)


def test_no_cards_and_service_errors_are_shown_plainly(chrome: Any, live: LiveServer) -> None:  # noqa: F811
    """An empty answer says "No cards"; a 500 shows its OperationOutcome text; no ECG is flagged."""
    _open(chrome, f"{live.url}/demo/")
    _pick(chrome, "pat-ben", "patient-view")
    assert _fire(chrome) == "no-cards"
    assert "No cards." in chrome.find_element("css selector", "#cards .no-cards").text

    _pick(chrome, "pat-cyd", "patient-view")
    assert _fire(chrome) == "service-error"
    error = chrome.find_element("css selector", "#cards .service-error").text
    assert "HTTP 500" in error and "Internal error; the service log has the details." in error

    _pick(chrome, "pat-dee", "patient-view")
    problem = chrome.find_element("id", "ecg-problem")
    assert problem.is_displayed() and problem.get_attribute("data-kind") == "no_ecg"
    assert not chrome.find_element("id", "ecg").is_displayed()


def test_fhir_server_down_is_shown_in_a_banner(
    chrome: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The patient list cannot load: the banner names the FHIR failure."""
    world = demo_world()
    app, _ = build_demo_app(tmp_path, world, fhir=MockFhir(world.resources, status=503))
    server = LiveServer.start(app)
    try:
        _open(chrome, f"{server.url}/demo/")
        assert _state(chrome) == "error"
        banner = chrome.find_element("id", "banner")
        assert banner.is_displayed() and "Cannot list patients" in banner.text and "503" in banner.text
    finally:
        server.stop()
        dispose_app(app)


def test_markdown_renderer_escapes_html_and_drops_unsafe_links(chrome: Any, live: LiveServer) -> None:  # noqa: F811
    """Card detail is untrusted Markdown: raw HTML is text, javascript: links are not links."""
    _open(chrome, f"{live.url}/demo/")
    source = (
        "# Head\n\n**b** *i* `<code>`\n\n- one\n- two\n\n1. first\n\n"
        "<img src=x onerror=alert(1)> [ok](https://example.org/a_b) [bad](javascript:alert)\n\n"
        "| a | b |\n|---|--:|\n| 1 | <script>x</script> |"
    )
    probe = chrome.execute_script(
        """
        var div = document.createElement('div');
        div.innerHTML = EcglabMarkdown.render(arguments[0]);
        return {
          tags: Array.from(div.querySelectorAll('*')).map(function (n) { return n.tagName; }),
          links: Array.from(div.querySelectorAll('a')).map(function (a) { return a.getAttribute('href'); }),
          text: div.textContent
        };
        """,
        source,
    )
    assert "IMG" not in probe["tags"] and "SCRIPT" not in probe["tags"]
    for tag in ("H1", "STRONG", "EM", "CODE", "UL", "OL", "LI", "TABLE", "TD", "P", "A"):
        assert tag in probe["tags"], tag
    assert probe["links"] == ["https://example.org/a_b"]
    assert "<img src=x onerror=alert(1)>" in probe["text"] and "<script>x</script>" in probe["text"]
    assert "<code>" in probe["text"]


def test_model_card_page_every_card_links_to_opens_in_the_browser(
    chrome: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``/model-card``: the demo model's notice first, then all 31 HTI-1 attributes; screenshot it."""
    from cds_service.app import create_app
    from fhir_mappings.manifest import load_manifest
    from tests.service_fixtures import FakeRuntime

    manifest = load_manifest(
        ARTIFACTS.parent / "models" / "ecglab-0.2.0-demo.manifest.json", verify_file=False
    )
    app = create_app(
        {
            "auth": False,
            "issuers": "",
            "database_url": f"sqlite:///{tmp_path / 'card.sqlite3'}",
            "metrics": False,
        },
        runtime=FakeRuntime(version=manifest.version, manifest=manifest),
    )
    server = LiveServer.start(app)
    try:
        chrome.get(f"{server.url}/model-card")
        assert chrome.title == f"Model card: {manifest.name} {manifest.version}"
        notice = chrome.find_element("css selector", ".notice")
        assert notice.is_displayed() and notice.text.startswith("NOT FOR CLINICAL USE")
        refs = [e.text for e in chrome.find_elements("css selector", "span.ref")]
        assert len(refs) == 31 and refs[0] == "(1)(i)" and refs[-1] == "(9)(ii)"
        assert manifest.onnx.sha256 in chrome.find_element("tag name", "body").text
        ARTIFACTS.mkdir(exist_ok=True)
        assert chrome.save_screenshot(str(ARTIFACTS / "model-card.png"))
    finally:
        server.stop()
        dispose_app(app)
