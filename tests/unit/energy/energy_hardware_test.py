"""The hardware profile: cgroup limits, GPUs through NVML, and its contract."""

from __future__ import annotations

from services.energy.hardware import profile_hardware
from shared.contracts.schemas import validate_payload


class FakeNvml:
    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{handle}"

    def nvmlDeviceGetName(self, handle):
        return b"Fake H100"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Memory", (), {"total": 80 * 2**30, "free": 70 * 2**30})()


def test_profile_of_this_machine_validates(tmp_path):
    profile = profile_hardware(use_nvml=False, cgroup_root=tmp_path / "no-cgroup")
    assert profile["cores"] >= 1 and profile["memory_available_bytes"] > 0
    assert profile["gpus"] == [] and profile["gpu_note"] == "NVML disabled"
    validate_payload("hardware.profiled", 1, profile)


def test_cgroup_limits_and_visible_gpus(tmp_path):
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("100000 100000\n")
    (cgroup / "memory.max").write_text(f"{2**30}\n")
    (cgroup / "memory.current").write_text(f"{2**28}\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU @ 3GHz\n")
    profile = profile_hardware(nvml=FakeNvml(), cuda_visible_devices="1", cgroup_root=cgroup, cpuinfo_path=cpuinfo)
    assert profile["cores"] == 1
    assert profile["memory_total_bytes"] == 2**30
    assert profile["memory_available_bytes"] <= 2**30 - 2**28
    assert profile["cpu_model"] == "Test CPU @ 3GHz"
    assert profile["gpus"] == [
        {"index": 1, "name": "Fake H100", "uuid": "GPU-1", "memory_total_bytes": 80 * 2**30, "memory_free_bytes": 70 * 2**30}
    ]
    validate_payload("hardware.profiled", 1, profile)
