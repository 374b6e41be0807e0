"""Running a soak: replica processes, their cycles gathered, raw data stored.

The validator's app hands a started run to ``run_soak``; it launches R
candidate and R baseline replicas (services/validator/replica.py), collects
each cycle from every replica still alive, and reports it through
``on_cycle``. A replica that dies is an incident in the cycle it died in; the
others go on. A soak resumed after a restart starts from the first cycle not
yet finished. The raw data (every sample of every replica; format in
``samples``) is written to the artefact store and returned with its URI and
the energy the soak took.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Awaitable, Callable

from shared.artefacts import ArtefactStore
from shared.energy_meter import EnergyMeter
from shared.paths import segment

log = logging.getLogger("neurons.validator.soak")
ROOT = Path(__file__).resolve().parents[2]


class Replica:
    def __init__(self, spec: dict[str, Any], spec_dir: Path, env: dict[str, str] | None) -> None:
        self.spec = spec
        self.path = spec_dir / f"{spec['replica_id']}.json"
        self.path.write_text(json.dumps(spec))
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.dead_reason: str | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.validator.replica", str(self.path), cwd=str(ROOT), env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=2**24)

    async def next_cycle(self) -> dict[str, Any] | None:
        """The replica's next cycle report, or None once it has exited."""
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                code = await self.proc.wait()
                if self.dead_reason is None:
                    err = (await self.proc.stderr.read()).decode(errors="replace").strip().splitlines()
                    self.dead_reason = f"replica exited with {code}" + (f": {err[-1]}" if err and code else "")
                return None
            try:
                report = json.loads(line)
            except json.JSONDecodeError:
                continue
            if report.get("event") == "cycle":
                return report

    async def stop(self) -> None:
        """Kill the process and reap it, so no zombie or open pipe outlives the soak."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=10.0)
        except asyncio.TimeoutError:
            log.warning("replica %s (pid %s) did not exit after SIGKILL", self.spec["replica_id"], self.proc.pid)


async def run_soak(
    run: dict[str, Any],
    *,
    model: str,
    dataset_path: str,
    store: ArtefactStore,
    eval_settings: dict[str, Any],
    cooldown_s: float,
    on_cycle: Callable[[int, list[dict[str, Any]], dict[str, Any]], Awaitable[bool]],
    on_replicas: Callable[[dict[str, int]], None] | None = None,
    env: dict[str, str] | None = None,
    fault: dict[str, Any] | None = None,
    done_cycles: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], str, dict | None]:
    """Soak ``run`` (a validation.started payload); returns (raw data, its URI, energy reading).

    A validation id that is not one plain file name raises ``shared.paths.UnsafePath``.

    ``done_cycles`` are the raw cycles a previous process finished before it
    died: the soak goes on from the next cycle instead of starting over.
    """
    segment(run["validation_id"])  # names a temporary folder and the raw data's file: UnsafePath unless one plain name
    fault = fault or {}
    meter = EnergyMeter()
    done = list(done_cycles or [])
    first = len(done) + 1
    raw: dict[str, Any] = {"validation_id": run["validation_id"], "adapter_sha256": run["adapter_sha256"],
                           "baseline": run["baseline"], "kind": run["kind"], "cycles": done}
    with tempfile.TemporaryDirectory(prefix=f"soak-{run['validation_id']}-") as tmp, meter.window("soak") as window:
        replicas = []
        for side in ("candidate", "baseline"):
            for i in range(int(run["replicas"])):
                adapter = (run["adapter_sha256"], run["adapter_uri"]) if side == "candidate" else \
                    (run["baseline"].get("adapter_sha256"), run["baseline"].get("adapter_uri"))
                spec = {
                    "replica_id": f"{side}-{i}", "side": side, "model": model,
                    "adapter_sha256": adapter[0], "adapter_uri": adapter[1], "kind": run["kind"],
                    "cycles": int(run["cycles"]) - len(done), "first_cycle": first - 1,
                    "episodes": int(run["episodes"]), "cooldown_s": cooldown_s,
                    "dataset_path": dataset_path, "eval": eval_settings,
                    # A jitter drill holds every episode of both sides for the same mean time and
                    # spreads it on the candidate's only: the latency's shape changes, not its location.
                    "latency_hold_ms": fault.get("latency_jitter_ms"),
                    "latency_jitter_ms": fault.get("latency_jitter_ms") if side == "candidate" else None,
                }
                replicas.append(Replica(spec, Path(tmp), env))
        if first > int(run["cycles"]):
            replicas = []
        for replica in replicas:
            await replica.start()
        if on_replicas:
            on_replicas({r.spec["replica_id"]: r.proc.pid for r in replicas if r.proc})
        try:
            for cycle in range(first, int(run["cycles"]) + 1):  # cycles count from 1, as the events say
                # Who is alive is fixed before the gather: a replica that dies during it marks
                # itself dead, and its report (None) must still pair with it, not with the next one.
                alive = [r for r in replicas if r.dead_reason is None]
                reports = await asyncio.gather(*(r.next_cycle() for r in alive))
                results = []
                for replica, report in zip(alive, reports):
                    if report is None:
                        results.append({"replica_id": replica.spec["replica_id"], "side": replica.spec["side"],
                                        "samples": {}, "incident": {"reason": replica.dead_reason}})
                    else:
                        results.append({"replica_id": report["replica_id"], "side": report["side"],
                                        "samples": report["samples"], "incident": None, "load": report["load"]})
                raw["cycles"].append({"cycle": cycle, "replicas": results})
                if not await on_cycle(cycle, results, raw["cycles"][-1]):
                    break
                if not any(r.dead_reason is None for r in replicas):
                    break
        finally:
            await asyncio.gather(*(replica.stop() for replica in replicas), return_exceptions=True)
    path = Path(tempfile.mkstemp(prefix="raw-", suffix=".json")[1])
    path.write_text(json.dumps(raw, sort_keys=True))
    _, uri = store.put_file(path, f"{run['validation_id']}.raw.json")
    path.unlink(missing_ok=True)
    return raw, uri, window.reading.to_dict() if window.reading else None
