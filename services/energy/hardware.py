"""What this node offers jobs: cores, memory, GPUs and current load (``hardware.profiled``).

Containers see the host's CPUs and RAM through psutil, so the cgroup limits
(v2, else v1) are applied: a job sized to the host would be killed by its own
cgroup.
"""

from __future__ import annotations

import math
import os
import platform
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from shared.energy_sources import load_nvml, visible_gpu_handles

# cgroup v1 reports "no limit" as a huge page-aligned number.
_NO_LIMIT = 1 << 60


def profile_hardware(
    *,
    nvml: Any | None = None,
    use_nvml: bool = True,
    cuda_visible_devices: str | None = None,
    cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
    cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo",
) -> dict[str, Any]:
    """A ``hardware.profiled`` payload for this machine, as this process sees it."""
    cgroup = Path(cgroup_root)
    memory = psutil.virtual_memory()
    total, available = int(memory.total), int(memory.available)
    limit = _cgroup_memory_limit(cgroup)
    if limit is not None and limit < total:
        used = _cgroup_memory_used(cgroup) or 0
        total, available = limit, max(0, min(available, limit - used))
    gpus, gpu_note = _gpus(nvml, use_nvml, cuda_visible_devices)
    profile: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(Path(cpuinfo_path)),
        "cores": _usable_cores(cgroup),
        "cpu_count_logical": psutil.cpu_count(logical=True) or 1,
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "memory_total_bytes": total,
        "memory_available_bytes": available,
        "memory_limit_bytes": limit,
        "gpus": gpus,
        "load_avg": [round(x, 3) for x in os.getloadavg()],
        "platform": platform.platform(),
        "profiled_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
    }
    if gpu_note:
        profile["gpu_note"] = gpu_note
    return profile


def _usable_cores(cgroup: Path) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


def _cgroup_cpu_quota(cgroup: Path) -> float | None:
    text = _read(cgroup / "cpu.max")
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota, period = _read(cgroup / "cpu" / "cpu.cfs_quota_us"), _read(cgroup / "cpu" / "cpu.cfs_period_us")
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def _cgroup_memory_limit(cgroup: Path) -> int | None:
    for path in (cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"):
        text = _read(path)
        if text and text != "max":
            value = int(text)
            return value if value < _NO_LIMIT else None
    return None


def _cgroup_memory_used(cgroup: Path) -> int | None:
    for path in (cgroup / "memory.current", cgroup / "memory" / "memory.usage_in_bytes"):
        text = _read(path)
        if text:
            return int(text)
    return None


def _cpu_model(cpuinfo: Path) -> str:
    text = _read(cpuinfo) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _gpus(
    nvml: Any | None, use_nvml: bool, cuda_visible_devices: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    if not use_nvml:
        return [], "NVML disabled"
    if nvml is None:
        nvml, why = load_nvml()
        if nvml is None:
            return [], why
    visible = cuda_visible_devices
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = []
    try:
        for label, handle in visible_gpu_handles(nvml, visible):
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                {
                    "index": int(label.removeprefix("gpu")),
                    "name": _text(nvml.nvmlDeviceGetName(handle)),
                    "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
                    "memory_total_bytes": int(info.total),
                    "memory_free_bytes": int(info.free),
                }
            )
    except Exception as exc:  # a driver hiccup should not stop the CPU profile
        return gpus, f"NVML: {exc}"
    return gpus, None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None
