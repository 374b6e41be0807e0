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
"""

from __future__ import annotations

import os
import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator
from shared.contracts.values import iso, parse_time

RAPL = "rapl"
NVML = "nvml"
MODEL = "model"
METHODS = (RAPL, NVML, MODEL)

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
# Without a configured or detected TDP: a typical server core under load.
DEFAULT_WATTS_PER_CORE = 10.0

CpuTime = Callable[[], float]


class SourceError(RuntimeError):
    """A source that was readable stopped being readable; the message says why."""


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


# --------------------------------------------------------------------------- sources


@dataclass
class _RaplDomain:
    name: str
    energy_path: Path
    max_range_uj: int | None
    last_uj: int = 0
    total_uj: int = 0


class RaplSource:
    """Package and DRAM counters of the powercap tree, accumulated across wraps.

    ``energy_uj`` wraps at ``max_energy_range_uj`` (minutes to an hour at full
    load). A wrap between two reads is corrected; two wraps are not, so long
    windows should ``poll`` (or ``snapshot``) at least every few minutes, which
    the trainer does on every progress event anyway.
    """

    method = RAPL

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_POWERCAP_ROOT) -> None:
        self.root = Path(root)
        self.domains: list[_RaplDomain] = []
        self.unavailable_reason: str | None = None
        self._discover()

    def _discover(self) -> None:
        if not self.root.is_dir():
            self.unavailable_reason = f"no powercap tree at {self.root}"
            return
        zones: dict[Path, tuple[str, str]] = {}
        for entry in sorted(self.root.glob("intel-rapl:*")):
            # Sub-zones appear both at the root and inside their parent.
            real = entry.resolve()
            if real in zones:
                continue
            name = _read_text(entry / "name")
            if name is not None:
                zones[real] = (entry.name, name)
        packages = {zid: n for zid, n in zones.values() if n.startswith("package")}
        chosen: list[tuple[str, str]] = []
        for zid, name in sorted(zones.values()):
            if name.startswith("package"):
                chosen.append((zid, name))
            elif name == "dram":
                # DRAM sits outside the package domain; core/uncore sit inside it.
                parent = packages.get(zid.rsplit(":", 1)[0], "package")
                chosen.append((zid, f"{parent}/dram"))
            elif name.startswith("psys") and not packages:
                # psys covers the whole SoC; counting it next to package would double-count.
                chosen.append((zid, name))
        if not chosen:
            self.unavailable_reason = f"no package or dram RAPL zone under {self.root}"
            return
        failures = []
        for zid, name in chosen:
            path = self.root / zid / "energy_uj"
            try:
                raw = int(path.read_text())
            except PermissionError:
                failures.append(f"{path} is not readable (root-only since Linux 5.10)")
                continue
            except (OSError, ValueError) as exc:
                failures.append(f"{path}: {exc}")
                continue
            max_range = _read_int(self.root / zid / "max_energy_range_uj")
            self.domains.append(_RaplDomain(name, path, max_range, last_uj=raw))
        if failures and not self.domains:
            self.unavailable_reason = "; ".join(failures)
        elif failures:
            # A partial CPU picture would read as measured but be too low.
            self.domains = []
            self.unavailable_reason = "some RAPL zones unreadable: " + "; ".join(failures)

    @property
    def available(self) -> bool:
        return bool(self.domains)

    def read(self) -> dict[str, float]:
        """Cumulative joules per domain since this source was created."""
        totals: dict[str, float] = {}
        for domain in self.domains:
            try:
                raw = int(domain.energy_path.read_text())
            except (OSError, ValueError) as exc:
                raise SourceError(f"RAPL {domain.name}: {exc}") from None
            delta = raw - domain.last_uj
            if delta < 0:
                if not domain.max_range_uj:
                    raise SourceError(
                        f"RAPL {domain.name} went backwards and max_energy_range_uj is unknown"
                    )
                delta += domain.max_range_uj
            domain.last_uj = raw
            domain.total_uj += delta
            totals[domain.name] = domain.total_uj / 1e6
        return totals

    def package_power_limit_w(self) -> float | None:
        """Sum of the packages' long-term power limits, a readable stand-in for TDP."""
        return powercap_tdp_w(self.root)


def powercap_tdp_w(root: str | os.PathLike[str] = DEFAULT_POWERCAP_ROOT) -> float | None:
    # The constraint files stay world-readable when energy_uj is not.
    total = 0.0
    base = Path(root)
    if not base.is_dir():
        return None
    for entry in sorted(base.glob("intel-rapl:*")):
        if entry.name.count(":") != 1:
            continue
        name = _read_text(entry / "name") or ""
        if not name.startswith("package"):
            continue
        uw = _read_int(entry / "constraint_0_max_power_uw") or _read_int(
            entry / "constraint_0_power_limit_uw"
        )
        if uw:
            total += uw / 1e6
    return total or None


def visible_gpu_handles(nvml: Any, cuda_visible_devices: str | None) -> list[tuple[str, Any]]:
    """(label, handle) of each GPU this process may use, as CUDA would number them.

    Unset means every GPU; an empty value or -1 means none. Entries are indices
    or GPU-/MIG- UUIDs (prefixes allowed, as CUDA allows). CUDA ignores
    everything after the first entry it cannot resolve, and so do we.
    """
    count = nvml.nvmlDeviceGetCount()
    if cuda_visible_devices is None:
        return [(f"gpu{i}", nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
    handles: list[tuple[str, Any]] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if not entry:
            break
        if entry.lstrip("-").isdigit():
            index = int(entry)
            if index < 0 or index >= count:
                break
            handles.append((f"gpu{index}", nvml.nvmlDeviceGetHandleByIndex(index)))
            continue
        found = _gpu_by_uuid(nvml, entry, count)
        if found is None:
            break
        handles.append(found)
    return handles


def _gpu_by_uuid(nvml: Any, wanted: str, count: int) -> tuple[str, Any] | None:
    for index in range(count):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = _as_str(nvml.nvmlDeviceGetUUID(handle))
        if uuid.startswith(wanted) or ("GPU-" + wanted.removeprefix("GPU-")) == uuid:
            return f"gpu{index}", handle
        if wanted.startswith("MIG-"):
            # Energy is counted per physical GPU, so a MIG slice reads its parent's counter.
            try:
                slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
            except Exception:
                continue
            for slot in range(slots):
                try:
                    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                    if _as_str(nvml.nvmlDeviceGetUUID(mig)).startswith(wanted):
                        return f"gpu{index}", handle
                except Exception:
                    continue
    return None


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def load_nvml() -> tuple[Any | None, str | None]:
    """The initialised ``pynvml`` module, or None and why not."""
    try:
        import pynvml  # noqa: PLC0415 - optional, and slow to import where unused
    except ImportError:
        return None, "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError subclasses: no driver, no library, no GPU
        return None, f"NVML unavailable: {exc}"
    return pynvml, None


class NvmlSource:
    """Total energy counter (mJ since driver load) of each visible GPU."""

    method = NVML

    def __init__(self, nvml: Any | None = None, cuda_visible_devices: str | None = None) -> None:
        self.unavailable_reason: str | None = None
        self.gpus: list[tuple[str, Any]] = []
        self._nvml = nvml
        self._base_mj: dict[str, int] = {}
        if nvml is None:
            self._nvml, self.unavailable_reason = load_nvml()
            if self._nvml is None:
                return
        try:
            gpus = visible_gpu_handles(self._nvml, cuda_visible_devices)
        except Exception as exc:
            self.unavailable_reason = f"NVML could not list GPUs: {exc}"
            return
        if not gpus:
            self.unavailable_reason = "no GPU visible to this process"
            return
        for label, handle in gpus:
            try:
                self._base_mj[label] = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            except Exception as exc:  # NotSupported before Volta
                self.unavailable_reason = f"{label}: total energy counter unsupported ({exc})"
                self._base_mj = {}
                return
        self.gpus = gpus

    @property
    def available(self) -> bool:
        return bool(self.gpus)

    def read(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for label, handle in self.gpus:
            try:
                mj = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            except Exception as exc:
                raise SourceError(f"NVML {label}: {exc}") from None
            totals[label] = (mj - self._base_mj[label]) / 1e3
        return totals


def process_cpu_seconds(include_children: bool = True) -> float:
    """User + system CPU seconds of this process (and its reaped children)."""
    # process_time has nanosecond resolution; os.times() ticks at 10 ms, too
    # coarse for a short validation window.
    total = time.process_time()
    if include_children:
        # Only children that have exited and been waited for are counted, which
        # covers data-loader workers and replicas once they finish.
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += usage.ru_utime + usage.ru_stime
    return total


@dataclass(frozen=True)
class CpuPowerModel:
    """Watts drawn per busy core, and where that figure came from."""

    watts_per_core: float
    source: str

    @classmethod
    def resolve(
        cls,
        *,
        tdp_w: float | None = None,
        cores: int | None = None,
        powercap_root: str | os.PathLike[str] = DEFAULT_POWERCAP_ROOT,
        env: dict[str, str] | None = None,
    ) -> "CpuPowerModel":
        env = os.environ if env is None else env
        cores = cores or os.cpu_count() or 1
        if tdp_w is not None:
            return cls(tdp_w / cores, f"TDP {tdp_w:g} W / {cores} cores (configured)")
        configured = env.get("NEURONS_CPU_TDP_W")
        if configured:
            try:
                value = float(configured)
            except ValueError:
                value = 0.0
            if value > 0:
                return cls(value / cores, f"TDP {value:g} W / {cores} cores (NEURONS_CPU_TDP_W)")
        detected = powercap_tdp_w(powercap_root)
        if detected:
            return cls(detected / cores, f"TDP {detected:g} W / {cores} cores (powercap limit)")
        return cls(
            DEFAULT_WATTS_PER_CORE,
            f"no TDP configured or detected, default {DEFAULT_WATTS_PER_CORE:g} W per core",
        )


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


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text) if text else None
    except ValueError:
        return None


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
