"""Where the energy meter's numbers come from: RAPL counters, NVML counters, a CPU model.

- ``RaplSource``: the CPU package and DRAM counters under ``/sys/class/powercap``,
  accumulated across counter wraps;
- ``NvmlSource``: the total-energy counter of every GPU this process may use
  (``CUDA_VISIBLE_DEVICES``, as CUDA resolves it);
- ``CpuPowerModel``: watts per busy core from a configured or detected TDP, for
  ``process_cpu_seconds`` when no CPU counter is readable.

``shared.energy_meter`` combines them into named, nestable windows and
re-exports these names.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RAPL = "rapl"
NVML = "nvml"
MODEL = "model"
METHODS = (RAPL, NVML, MODEL)

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
# Without a configured or detected TDP: a typical server core under load.
DEFAULT_WATTS_PER_CORE = 10.0


class SourceError(RuntimeError):
    """A source that was readable stopped being readable; the message says why."""


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
