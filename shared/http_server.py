"""Serving an HTTP API inside a service's worker: binding, the bearer token, the address file.

The registry's API and the serving API both bind loopback unless a
deployment says otherwise; an address off loopback needs a token, and with a
token every request carries ``Authorization: Bearer <token>`` (compared in
constant time). The API runs as a task of the worker's loop; a taken port
costs the API, never the worker.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("neurons.http")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the API on this machine; a host name other than localhost counts as not."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def binding_problem(what: str, host: str, token: str | None, host_var: str) -> str | None:
    """Why ``what`` must not be served on ``host`` (off loopback with no token), or None."""
    if token or is_loopback(host):
        return None
    return (f"{what} not served: {host_var}={host} is not a loopback address and NEURONS_API_TOKEN is not set; "
            "set a token (every request then carries 'Authorization: Bearer <token>') or bind 127.0.0.1")


def require_bearer(app: Any, token: str, refusal: Callable[[str], Any]) -> None:
    """Every request to ``app`` carries ``Authorization: Bearer <token>``; else ``refusal(detail)`` (a 401 response)."""
    expected = token.encode()

    @app.middleware("http")
    async def bearer_token(request, call_next):
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken says nothing about how much of the token was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
            return refusal("this API needs the header 'Authorization: Bearer <NEURONS_API_TOKEN>'")
        return await call_next(request)


def bind(what: str, host: str, port: int, host_var: str, port_var: str) -> socket.socket | None:
    """A listening socket on ``host``:``port``; None, said in one log line, when it cannot be had."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        if sock is not None:
            sock.close()
        log.error("%s not served: cannot bind %s port %s (%s); set %s/%s", what, host, port, exc, host_var, port_var)
        return None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def local_url(host: str, port: int) -> str:
    """Where a client on this machine reaches an API bound to ``host``."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def serve_in(service: Any, app: Any, sock: socket.socket, *, host: str, address: Path, token_required: bool,
             what: str) -> str:
    """Run ``app`` on ``sock`` as a task of ``service``'s loop and write where it listens to ``address``; its URL."""
    import uvicorn

    class Server(uvicorn.Server):
        # faust owns the process's signals; uvicorn must not take them over
        def capture_signals(self):
            return nullcontext()

    server = Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    port = sock.getsockname()[1]
    url = local_url(host, port)
    address.parent.mkdir(parents=True, exist_ok=True)
    address.write_text(json.dumps({"port": port, "host": host, "url": url, "token_required": token_required}))

    async def run() -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit:  # uvicorn exits on a failed start-up; the worker goes on without the API
            log.error("%s stopped on start-up", what)

    service.spawn(run())
    log.info("%s at %s", what, url)
    return url
