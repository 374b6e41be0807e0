"""Each service as its own process, with pid and log files under var/run and var/log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from shared import broker
from shared.settings import Settings
from shared.topics import SERVICES


def die_with_parent() -> None:
    """In a job's child process: be killed when the service that started it dies (Linux).

    A service killed mid-job must not leave a second worker on the same job
    when it comes back; elsewhere the service stops its workers itself.
    """
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _pid_file(settings: Settings, service: str) -> Path:
    return settings.run_dir / f"{service}.pid"


def log_file(settings: Settings, service: str) -> Path:
    return settings.log_dir / f"{service}.log"


def service_pid(settings: Settings, service: str) -> int | None:
    path = _pid_file(settings, service)
    if not path.exists():
        return None
    try:
        return int(path.read_text().strip())
    except ValueError:
        return None


def service_state(settings: Settings, service: str) -> str:
    return "running" if broker.pid_alive(service_pid(settings, service)) else "stopped"


def databases(settings: Settings, services: tuple[str, ...] = SERVICES) -> dict[str, list[str]]:
    """Each database the services use, with the services on it: one SQLite file each, or the one shared URL."""
    held: dict[str, list[str]] = {}
    for name in services:
        held.setdefault(settings.db_url(name), []).append(name)
    return held


def upgrade_databases(settings: Settings, services: tuple[str, ...] = SERVICES) -> list[dict]:
    """Bring every database the services use to the head revision: for each, its URL (without
    password), the services on it and its revision before and after."""
    from shared import db

    report = []
    for url, names in databases(settings, services).items():
        before, after = db.migrate(url)
        report.append({"url": db.shown(url), "services": names, "before": before, "revision": after})
    return report


def start_service(settings: Settings, service: str, env: dict[str, str] | None = None) -> int:
    """Start ``python -m services.<service>``, its database first brought to the head revision."""
    if service_state(settings, service) == "running":
        return service_pid(settings, service)  # type: ignore[return-value]
    from shared import db

    db.migrate(settings.db_url(service))
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    _ready_file(settings, service).unlink(missing_ok=True)
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["NEURONS_VAR"] = str(settings.var_dir)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_file(settings, service), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            cwd=str(Path(__file__).resolve().parent.parent),
            start_new_session=True,
        )
    _pid_file(settings, service).write_text(str(proc.pid))
    return proc.pid


def _ready_file(settings: Settings, service: str) -> Path:
    return settings.run_dir / f"{service}.ready"


def stop_service(settings: Settings, service: str, timeout_s: float = 15.0) -> bool:
    pid = service_pid(settings, service)
    running = broker.pid_alive(pid)
    if running and pid:
        broker.terminate(pid, timeout_s)
    _pid_file(settings, service).unlink(missing_ok=True)
    return running


def kill_service(settings: Settings, service: str) -> None:
    """SIGKILL, as a crash would; the pid file stays so status shows it stopped."""
    import signal

    pid = service_pid(settings, service)
    if pid and broker.pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while broker.pid_alive(pid) and time.monotonic() < deadline:  # gone before anyone restarts it
            broker._reap(pid)
            time.sleep(0.05)


def up(settings: Settings, services: tuple[str, ...] = SERVICES) -> dict:
    info = broker.start(settings)
    import asyncio

    from shared.keys import ensure_service_keys
    from shared.topics import ensure_topics

    asyncio.run(ensure_topics(settings))
    ensure_service_keys(settings)  # the embedded platform's service keys, anchored in the trust file
    upgraded = upgrade_databases(settings, services)  # before any service starts, as each checks its schema
    pids = {name: start_service(settings, name) for name in services}
    return {"broker": info.bootstrap_servers, "services": pids, "databases": upgraded}


def stop_services(settings: Settings, services: tuple[str, ...] = SERVICES) -> dict[str, bool]:
    """Stop ``services`` together: each gets SIGTERM at once, as each needs a second or two to leave its
    group; which of them were running."""
    from concurrent.futures import ThreadPoolExecutor

    if not services:
        return {}
    with ThreadPoolExecutor(max_workers=len(services)) as pool:
        results = list(pool.map(lambda name: stop_service(settings, name), services))
    return dict(zip(services, results))


def down(settings: Settings, services: tuple[str, ...] = SERVICES) -> dict:
    stopped: dict = stop_services(settings, services)
    stopped["broker"] = broker.stop(settings)
    return stopped


def status(settings: Settings, services: tuple[str, ...] = SERVICES) -> dict:
    b = broker.status(settings)
    return {
        "bootstrap_servers": b.bootstrap_servers or None,
        "broker": {"name": "broker", "pid": b.pid, "state": b.state if b.state != "external" else "running"},
        "services": [
            {"name": name, "pid": service_pid(settings, name), "state": service_state(settings, name),
             "log": str(log_file(settings, name)), "url": _api_url(settings, name),
             "metrics_url": _metrics_url(settings, name)}
            for name in services
        ],
    }


# the HTTP APIs some services serve: where each wrote its address (shared.http_server.serve_in)
_API_FILES = {"registry": "registry-api.json", "serving": "serving-api.json"}


def _api_url(settings: Settings, service: str) -> str | None:
    name = _API_FILES.get(service)
    path = settings.run_dir / name if name else None
    if path is None or not path.exists() or service_state(settings, service) != "running":
        return None
    try:
        return json.loads(path.read_text()).get("url")
    except (ValueError, OSError):
        return None


def _metrics_url(settings: Settings, service: str) -> str | None:
    """Where a running service answers GET /metrics (it writes the address at start-up, shared.metrics)."""
    from shared.metrics import metrics_address

    path = metrics_address(settings, service)
    if not path.exists() or service_state(settings, service) != "running":
        return None
    try:
        return json.loads(path.read_text()).get("url")
    except (ValueError, OSError):
        return None


def wait_ready(settings: Settings, services: tuple[str, ...] = SERVICES, timeout_s: float = 90.0) -> None:
    """Wait until every service has joined its consumer group and holds partitions; a service that
    exited instead is named with the last line of its log."""
    failed = wait_started(settings, services, timeout_s)
    if failed:
        raise RuntimeError("; ".join(f"service {name} exited: {line} (log {log_file(settings, name)})"
                                     for name, line in failed.items()))


def wait_started(settings: Settings, services: tuple[str, ...] = SERVICES, timeout_s: float = 90.0) -> dict[str, str]:
    """Wait until each service is ready (joined its group) or has exited; those that exited, each with
    the last line of its log. ``TimeoutError`` names those still neither after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pending, failed = set(services), {}
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            marker = _ready_file(settings, name)
            if marker.exists() and marker.read_text().strip() == str(service_pid(settings, name)):
                pending.discard(name)
            elif service_state(settings, name) == "stopped":
                failed[name] = last_log_line(settings, name)
                pending.discard(name)
        if pending:
            time.sleep(0.3)
    if pending:
        raise TimeoutError(f"services not ready after {timeout_s:.0f}s: {sorted(pending)}")
    return failed


def last_log_line(settings: Settings, service: str) -> str:
    """The last non-empty line of the service's log (what a service that stopped said last)."""
    path = log_file(settings, service)
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 8192))
            lines = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"
