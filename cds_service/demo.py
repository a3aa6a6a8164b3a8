"""``ecglab demo`` (and ``make demo``): the whole product on real components, in one command.

Steps, each reported with its duration:

1. start a real FHIR R4 server (``sekmet-fhir`` from ``.venv-fhir``) with a SQLite file under
   ``.demo/`` — it survives restarts, so a second run starts in seconds;
2. seed it with ``ecglab seed-fhir`` (a dozen patients: the real teaching ECG, every ECG carrier,
   pending orders and recent results) unless the server already holds the demo patients;
3. start the CDS Hooks service under gunicorn with the bundled model (auth off — development mode,
   loopback only — and the card-preview page at ``/demo``);
4. fire ``patient-view`` and ``order-select`` for every patient, the way an EHR does with no
   prefetch (the service reads the FHIR server itself), and print the cards as a table.

``--once`` stops everything afterwards and exits 0 only when at least one card was shown (the
test suite uses it). Otherwise the demo keeps running and prints its URLs until Ctrl-C, which
stops everything it started (and nothing it did not start).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cds_service.cards import CARD_EXTENSION  # the cards' machine-readable facts
from fhir_mappings.errors import EcglabError

FHIR_SETTINGS = """host: 127.0.0.1
port: {port}
base_url: {base}
data_dir: {data_dir}
simulator: {{enabled: false}}
log_inbound: false
"""

DEMO_TOKEN = "demo-access-token"  # what the demo "EHR" hands the service for FHIR reads


class DemoError(EcglabError):
    """A demo step failed; the message names the step and what to do."""


@dataclass
class DemoCard:
    """One row of the terminal table."""

    patient: str
    hook: str
    lab: str
    when: str
    probability: str
    indicator: str


@dataclass
class Demo:
    """Processes and addresses of one demo run."""

    root: Path
    fhir_port: int
    service_port: int
    patients: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def fhir_base(self) -> str:
        return f"http://127.0.0.1:{self.fhir_port}/fhir"

    @property
    def service_base(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--once", action="store_true", help="fire the hooks, print the cards, stop everything and exit"
    )
    parser.add_argument(
        "--dir", type=Path, default=Path(".demo"), help="state folder (FHIR database, logs); default .demo"
    )
    parser.add_argument("--fhir-port", type=int, default=8091, help="FHIR server port (default 8091)")
    parser.add_argument("--port", type=int, default=8092, help="CDS service port (default 8092)")
    parser.add_argument("--patients", type=int, default=12, help="demo patients to seed (default 12)")
    parser.add_argument(
        "--sekmet", type=Path, default=Path(".venv-fhir/bin/sekmet"), help="sekmet-fhir executable"
    )
    parser.add_argument("--reseed", action="store_true", help="wipe the demo FHIR database and seed again")


def run(args: argparse.Namespace) -> int:
    demo = Demo(args.dir.resolve(), args.fhir_port, args.port, args.patients)
    demo.root.mkdir(parents=True, exist_ok=True)
    if args.reseed:
        shutil.rmtree(demo.root / "fhir-data", ignore_errors=True)
    try:
        with _stopping(demo):
            _start_fhir(demo, args.sekmet)
            _seed(demo)
            _start_service(demo)
            cards = _fire_hooks(demo)
            _print_cards(cards)
            if args.once:
                return 0 if cards else 1
            _print_urls(demo)
            _wait_for_interrupt(demo)
    except DemoError as exc:
        print(f"\necglab demo: {exc}", file=sys.stderr)
        return 1
    return 0


# -- process management ------------------------------------------------------------------------------


@contextlib.contextmanager
def _stopping(demo: Demo) -> Iterator[None]:
    """Stop every process the demo started, newest first, whatever happens."""
    try:
        yield
    finally:
        for proc in reversed(demo.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(demo.processes):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)  # reaped, so its ports are free when the demo returns


@contextlib.contextmanager
def _step(title: str) -> Iterator[None]:
    print(f"• {title} …", end="", flush=True)
    started = time.monotonic()
    try:
        yield
    except DemoError:
        print(" failed", flush=True)
        raise
    print(f" done ({time.monotonic() - started:.1f} s)", flush=True)


def _get(url: str, timeout: float = 2.0) -> int | None:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.HTTPError:
        return None


def _wait_until_up(
    url: str, proc: subprocess.Popen[bytes] | None, log_file: Path, what: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else ""
            raise DemoError(
                f"{what} exited with status {proc.returncode}. Its log ({log_file}) ends with:\n{tail}"
            )
        if _get(url) == 200:
            return
        time.sleep(0.2)
    raise DemoError(f"{what} did not answer {url} within {timeout:.0f} s; see {log_file}")


def _start_fhir(demo: Demo, sekmet: Path) -> None:
    with _step(f"Starting the FHIR R4 server (sekmet-fhir) on {demo.fhir_base}"):
        if _get(f"{demo.fhir_base}/metadata") == 200:
            return  # one is already running on that port (e.g. a second demo): reuse it
        found = sekmet if sekmet.exists() else (Path(p) if (p := shutil.which("sekmet")) else None)
        if found is None:
            raise DemoError(
                f"{sekmet} is missing. Run 'make demo' (it creates .venv-fhir) or 'make install'."
            )
        sekmet = found.resolve()  # the server runs with the state folder as its working directory
        data_dir = demo.root / "fhir-data"
        data_dir.mkdir(exist_ok=True)
        settings = demo.root / "fhir-settings.yaml"
        settings.write_text(FHIR_SETTINGS.format(port=demo.fhir_port, base=demo.fhir_base, data_dir=data_dir))
        log_file = demo.root / "fhir.log"
        with log_file.open("wb") as log:
            proc = subprocess.Popen(
                [str(sekmet), "serve", "-c", str(settings)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=demo.root,
            )
        demo.processes.append(proc)
        _wait_until_up(f"{demo.fhir_base}/metadata", proc, log_file, "The FHIR server", timeout=60)


def _demo_patients(demo: Demo) -> list[tuple[str, str]]:
    """(id, display name) of the seeded demo patients, from the FHIR server itself."""
    import httpx

    response = httpx.get(
        f"{demo.fhir_base}/Patient",
        params={"_count": "200"},
        headers={"Accept": "application/fhir+json"},
        timeout=10,
    )
    if response.status_code != 200:
        raise DemoError(f"listing patients on {demo.fhir_base} failed with HTTP {response.status_code}")
    patients = []
    for entry in response.json().get("entry", []):
        resource = entry.get("resource", {})
        name = (resource.get("name") or [{}])[0]
        display = name.get("text") or " ".join([*name.get("given", []), name.get("family", "")]).strip()
        patients.append((resource["id"], display or resource["id"]))
    return sorted(patients)


def _seed(demo: Demo) -> None:
    with _step(f"Seeding demo patients into the FHIR server ({demo.patients} patients)"):
        if len(_demo_patients(demo)) >= demo.patients:
            return  # already seeded on an earlier run
        log_file = demo.root / "seed.log"
        command = [
            sys.executable,
            "-m",
            "cds_service.cli",
            "seed-fhir",
            "--fhir-url",
            demo.fhir_base,
            "--patients",
            str(demo.patients),
        ]
        with log_file.open("wb") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            tail = log_file.read_text(errors="replace")[-1500:]
            raise DemoError(f"seeding failed (exit {result.returncode}); {log_file} ends with:\n{tail}")


def _start_service(demo: Demo) -> None:
    with _step(f"Starting the CDS Hooks service with the bundled model on {demo.service_base}"):
        if _get(f"{demo.service_base}/healthz") == 200:
            return
        env = dict(os.environ)
        env.update(
            ECGLAB_AUTH="off",
            ECGLAB_DEMO="on",
            ECGLAB_DEV_FHIR_SERVERS=demo.fhir_base,
            ECGLAB_PUBLIC_URL=demo.service_base,
            ECGLAB_HOST="127.0.0.1",
            ECGLAB_PORT=str(demo.service_port),
            ECGLAB_WORKERS="2",
            ECGLAB_DATABASE_URL=f"sqlite:///{demo.root / 'ecglab.sqlite3'}",
            ECGLAB_BUDGET_MS="5000",
        )
        log_file = demo.root / "service.log"
        with log_file.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cds_service.cli", "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        demo.processes.append(proc)
        _wait_until_up(f"{demo.service_base}/healthz", proc, log_file, "The CDS service", timeout=90)


# -- hooks ------------------------------------------------------------------------------------------------


def hook_request(
    hook: str, patient_id: str, fhir_base: str, *, lab_order: tuple[str, str] | None = None
) -> dict:
    """A CDS Hooks request as an EHR sends it without prefetch: the service reads FHIR itself."""
    context: dict[str, object] = {"userId": "Practitioner/demo-clinician", "patientId": patient_id}
    if hook in {"order-select", "order-sign"}:
        code, display = lab_order or ("24323-8", "Comprehensive metabolic 2000 panel - Serum or Plasma")
        draft = {
            "resourceType": "ServiceRequest",
            "id": f"draft-{uuid.uuid4().hex[:8]}",
            "status": "draft",
            "intent": "proposal",
            "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
            "subject": {"reference": f"Patient/{patient_id}"},
        }
        context["draftOrders"] = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": draft}],
        }
        if hook == "order-select":
            context["selections"] = [f"ServiceRequest/{draft['id']}"]
    return {
        "hookInstance": str(uuid.uuid4()),
        "hook": hook,
        "fhirServer": fhir_base,
        "fhirAuthorization": {
            "access_token": DEMO_TOKEN,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "ecglab-demo",
        },
        "context": context,
    }


def _fire_hooks(demo: Demo) -> list[DemoCard]:
    import httpx

    patients = _demo_patients(demo)
    rows: list[DemoCard] = []
    with (
        _step(f"Firing patient-view and order-select for {len(patients)} patients"),
        httpx.Client(timeout=30) as client,
    ):
        discovery = client.get(f"{demo.service_base}/cds-services").json()
        by_hook = {service["hook"]: service["id"] for service in discovery.get("services", [])}
        for patient_id, name in patients:
            for hook in ("patient-view", "order-select"):
                service_id = by_hook.get(hook)
                if service_id is None:
                    raise DemoError(f"the service's discovery lists no {hook} service")
                response = client.post(
                    f"{demo.service_base}/cds-services/{service_id}",
                    json=hook_request(hook, patient_id, demo.fhir_base),
                )
                if response.status_code != 200:
                    raise DemoError(
                        f"{hook} for {name} answered HTTP {response.status_code}: {response.text[:300]}"
                    )
                for card in response.json().get("cards", []):
                    rows.append(_row(name, hook, card))
    return rows


def _row(patient: str, hook: str, card: dict) -> DemoCard:
    extension = card.get("extension")
    facts = extension.get(CARD_EXTENSION, {}) if isinstance(extension, dict) else {}
    lab = facts.get("lab") or card.get("summary", "")[:40]
    horizons = facts.get("horizons") or []
    when = ", ".join("now" if h == 0 else f"≤{h} min" for h in horizons) or "—"
    probability = facts.get("probability")
    return DemoCard(
        patient=patient,
        hook=hook,
        lab=str(lab),
        when=when,
        probability=f"{probability:.2f}" if isinstance(probability, int | float) else "—",
        indicator=str(card.get("indicator", "")),
    )


def _print_cards(rows: list[DemoCard]) -> None:
    if not rows:
        print("\nNo cards: no patient had a lab predicted abnormal above its decision threshold.")
        return
    headers = ("Patient", "Hook", "Lab", "Now / forecast", "Prob.", "Indicator")
    table = [(r.patient, r.hook, r.lab, r.when, r.probability, r.indicator) for r in rows]
    widths = [max(len(h), *(len(str(row[i])) for row in table)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(f"\n{line}\n{'  '.join('-' * w for w in widths)}")
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print(f"\n{len(rows)} cards. Demo model trained on synthetic data — not for clinical use.")


def _print_urls(demo: Demo) -> None:
    print(
        "\nThe demo is running (Ctrl-C stops everything it started):\n"
        f"  CDS Hooks discovery  {demo.service_base}/cds-services\n"
        f"  Card preview page    {demo.service_base}/demo\n"
        f"  FHIR R4 server       {demo.fhir_base}\n"
        f"  FHIR server console  http://127.0.0.1:{demo.fhir_port}/ui\n"
        f"  Logs                 {demo.root}/*.log",
        flush=True,
    )


def _wait_for_interrupt(demo: Demo) -> None:
    try:
        while True:
            for proc in demo.processes:
                if proc.poll() is not None:
                    raise DemoError(
                        f"a demo process (pid {proc.pid}) exited with status {proc.returncode}; see {demo.root}/*.log"
                    )
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nStopping the demo …", flush=True)
