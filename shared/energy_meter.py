"""Measured energy of a piece of work, read in-process by the trainer and the validator.

An ``EnergyMeter`` reads the best source the machine offers and says which one
it used, per component:

- ``rapl``: the CPU package and DRAM counters under ``/sys/class/powercap``;
- ``nvml``: the total-energy counter of every GPU this process may use
  (``CUDA_VISIBLE_DEVICES``);
- ``model``: when no CPU counter is readable, the process's CPU seconds times a
  per-core power derived from the CPU's TDP. It is an estimate and is labelled
  as one.

Windows are named and may nest, like stopwatches::

    meter = EnergyMeter()
    with meter.window("train") as train:
        ...
        progress(energy_j=meter.snapshot("train"))
    train.reading.to_dict()  # {"joules": ..., "method": "rapl", ...}

A reading that cannot be taken is ``joules=None`` with a reason, never 0 J:
zero would read as "this job was free" in every report and budget downstream.

Begin, end and snapshot cost one ``times()`` call, a few small sysfs reads and
one NVML call per GPU, so they can sit inside a training step.

The sources themselves (and ``CpuPowerModel``) are in ``shared.energy_sources``.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from shared.contracts.values import iso, parse_time
from shared.energy_sources import (
    DEFAULT_POWERCAP_ROOT,
    METHODS,
    MODEL,
    NVML,
    RAPL,
    CpuPowerModel,
    NvmlSource,
    RaplSource,
    SourceError,
    load_nvml,
    powercap_tdp_w,
    process_cpu_seconds,
    visible_gpu_handles,
)

CpuTime = Callable[[], float]


# --------------------------------------------------------------------------- readings


@dataclass(frozen=True)
class Component:
    name: str
    joules: float | None
    method: str
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "joules": self.joules, "method": self.method}
        if self.reason:
            data["reason"] = self.reason
        return data


@dataclass(frozen=True)
class Reading:
    """The energy of one window. ``joules`` is None (with a reason) when unknown."""

    joules: float | None
    method: str | None
    components: tuple[Component, ...] = ()
    duration_s: float | None = None
    cpu_s: float | None = None
    reason: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None

    @classmethod
    def unavailable(
        cls,
        reason: str,
        *,
        duration_s: float | None = None,
        started_at: datetime | None = None,
        ended_at: datetime | None = None,
    ) -> "Reading":
        """A reading for work whose energy could not be measured at all."""
        return cls(
            joules=None,
            method=None,
            duration_s=duration_s,
            reason=reason,
            started_at=started_at,
            ended_at=ended_at,
        )

    @property
    def wh(self) -> float | None:
        return None if self.joules is None else self.joules / 3600.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "joules": self.joules,
            "method": self.method,
            "components": [c.to_dict() for c in self.components],
            "duration_s": self.duration_s,
            "cpu_s": self.cpu_s,
            "reason": self.reason,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Reading":
        return cls(
            joules=data.get("joules"),
            method=data.get("method"),
            components=tuple(
                Component(c["name"], c.get("joules"), c["method"], c.get("reason"))
                for c in data.get("components") or ()
            ),
            duration_s=data.get("duration_s"),
            cpu_s=data.get("cpu_s"),
            reason=data.get("reason"),
            started_at=_parse_iso(data.get("started_at")),
            ended_at=_parse_iso(data.get("ended_at")),
        )


def _iso(ts: datetime | None) -> str | None:
    return iso(ts) if ts is not None else None


def _parse_iso(value: str | None) -> datetime | None:
    return parse_time(value) if value else None


# --------------------------------------------------------------------------- meter


@dataclass(frozen=True)
class _Sample:
    mono: float
    wall: datetime
    cpu_s: float
    totals: dict[str, float | None]
    errors: dict[str, str]


@dataclass
class Window:
    """An open or finished window; ``reading`` is set when it ends."""

    name: str
    meter: "EnergyMeter"
    reading: Reading | None = None

    def so_far(self) -> float | None:
        return self.meter.snapshot(self.name) if self.reading is None else self.reading.joules


@dataclass
class EnergyMeter:
    """Named, nestable energy windows over the best available sources."""

    powercap_root: str | os.PathLike[str] = DEFAULT_POWERCAP_ROOT
    use_rapl: bool = True
    use_nvml: bool = True
    use_model: bool = True
    cpu_time: CpuTime | None = None
    include_children: bool = True
    tdp_w: float | None = None
    cores: int | None = None
    cuda_visible_devices: str | None = None
    nvml: Any | None = None
    monotonic: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
    readings: dict[str, Reading] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, _Sample] = {}
        self._notes: list[str] = []
        self._sources: list[RaplSource | NvmlSource] = []
        if self.cpu_time is None:
            include = self.include_children
            self.cpu_time = lambda: process_cpu_seconds(include)
        if self.use_rapl:
            rapl = RaplSource(self.powercap_root)
            if rapl.available:
                self._sources.append(rapl)
            else:
                self._notes.append(f"RAPL: {rapl.unavailable_reason}")
        else:
            self._notes.append("RAPL: disabled")
        if self.use_nvml:
            visible = self.cuda_visible_devices
            if visible is None:
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpu = NvmlSource(self.nvml, visible)
            if gpu.available:
                self._sources.append(gpu)
            else:
                self._notes.append(f"NVML: {gpu.unavailable_reason}")
        self.power_model: CpuPowerModel | None = None
        # The model stands in for the CPU only when no CPU counter is readable.
        if self.use_model and not any(isinstance(s, RaplSource) for s in self._sources):
            self.power_model = CpuPowerModel.resolve(
                tdp_w=self.tdp_w, cores=self.cores, powercap_root=self.powercap_root
            )
        self._origin = self._sample()

    # -- what the meter reads ---------------------------------------------------
    @property
    def methods(self) -> list[str]:
        methods = [s.method for s in self._sources]
        if self.power_model is not None:
            methods.append(MODEL)
        return methods

    @property
    def notes(self) -> list[str]:
        """Why each better source is not in use."""
        return list(self._notes)

    def _sample(self) -> _Sample:
        with self._lock:
            mono = self.monotonic()
            cpu_s = float(self.cpu_time())
            totals: dict[str, float | None] = {}
            errors: dict[str, str] = {}
            for source in self._sources:
                try:
                    totals.update(source.read())
                except SourceError as exc:
                    names = (
                        [d.name for d in source.domains]
                        if isinstance(source, RaplSource)
                        else [label for label, _ in source.gpus]
                    )
                    for name in names:
                        totals[name] = None
                        errors[name] = str(exc)
            if self.power_model is not None:
                totals["cpu"] = cpu_s * self.power_model.watts_per_core
            return _Sample(mono, self.wall_clock(), cpu_s, totals, errors)

    def _method_of(self, name: str) -> str:
        if name == "cpu" and self.power_model is not None:
            return MODEL
        for source in self._sources:
            if isinstance(source, RaplSource) and any(d.name == name for d in source.domains):
                return RAPL
        return NVML

    # -- windows ------------------------------------------------------------------
    def begin(self, name: str) -> None:
        if name in self._open:
            raise ValueError(f"energy window {name!r} is already open")
        self._open[name] = self._sample()

    def end(self, name: str) -> Reading:
        start = self._open.pop(name, None)
        if start is None:
            raise ValueError(f"energy window {name!r} was never begun")
        reading = self._between(start, self._sample())
        self.readings[name] = reading
        return reading

    @contextmanager
    def window(self, name: str) -> Iterator[Window]:
        handle = Window(name, self)
        self.begin(name)
        try:
            yield handle
        finally:
            handle.reading = self.end(name)

    def poll(self) -> None:
        """Read every counter, so that a counter wrap between two windows is not missed."""
        self._sample()

    def snapshot(self, name: str | None = None) -> float | None:
        """Joules so far: in the open window ``name``, or since the meter was made."""
        start = self._origin if name is None else self._open.get(name)
        if start is None:
            raise ValueError(f"energy window {name!r} is not open")
        return self._between(start, self._sample()).joules

    def _between(self, start: _Sample, end: _Sample) -> Reading:
        duration = max(0.0, end.mono - start.mono)
        cpu_s = max(0.0, end.cpu_s - start.cpu_s)
        components: list[Component] = []
        missing: list[str] = []
        for name in end.totals:
            before, after = start.totals.get(name), end.totals[name]
            method = self._method_of(name)
            if before is None or after is None:
                why = end.errors.get(name) or start.errors.get(name) or "counter unreadable"
                components.append(Component(name, None, method, why))
                missing.append(f"{name}: {why}")
            else:
                components.append(Component(name, max(0.0, after - before), method))
        common = dict(
            components=tuple(components),
            duration_s=duration,
            cpu_s=cpu_s,
            started_at=start.wall,
            ended_at=end.wall,
        )
        if not components:
            reason = "no energy source: " + "; ".join(self._notes or ["all sources disabled"])
            return Reading(joules=None, method=None, reason=reason, **common)
        if missing:
            return Reading(
                joules=None,
                method=_overall_method(components),
                reason="incomplete reading, " + "; ".join(missing),
                **common,
            )
        joules = sum(c.joules for c in components if c.joules is not None)
        method = _overall_method(components)
        reason = None
        if method == MODEL and self.power_model is not None:
            reason = (
                f"CPU modelled: {cpu_s:.3f} CPU-s x {self.power_model.watts_per_core:.3g} W/core "
                f"({self.power_model.source}); " + "; ".join(self._notes)
            )
        return Reading(joules=joules, method=method, reason=reason, **common)


def _overall_method(components: list[Component]) -> str:
    # A total that is partly estimated is an estimate.
    methods = {c.method for c in components}
    for method in (MODEL, RAPL, NVML):
        if method in methods:
            return method
    return MODEL


def measure_overhead(
    step_fn: Callable[[], Any], steps: int = 50, meter: EnergyMeter | None = None
) -> float:
    """The meter's cost relative to the work: begin+end+snapshot time / step time.

    Timing the meter apart from the step keeps the answer stable; the
    difference of two noisy step timings would not be.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    meter = meter or EnergyMeter()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    step_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        name = f"__overhead_{i}"
        meter.begin(name)
        meter.snapshot(name)
        meter.end(name)
    meter_time = time.perf_counter() - t0
    for i in range(steps):
        meter.readings.pop(f"__overhead_{i}", None)
    return meter_time / step_time if step_time > 0 else float("inf")


__all__ = [
    "Component",
    "CpuPowerModel",
    "EnergyMeter",
    "METHODS",
    "MODEL",
    "NVML",
    "NvmlSource",
    "RAPL",
    "RaplSource",
    "Reading",
    "SourceError",
    "Window",
    "load_nvml",
    "measure_overhead",
    "powercap_tdp_w",
    "process_cpu_seconds",
    "visible_gpu_handles",
]
