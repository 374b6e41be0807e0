"""The in-process meter: RAPL counters (with wrap), NVML, the labelled process model, and nulls."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.energy_meter import (
    CpuPowerModel,
    EnergyMeter,
    RaplSource,
    Reading,
    measure_overhead,
    visible_gpu_handles,
)


def make_powercap(root: Path, *, package_uj: int = 1_000, dram_uj: int = 500, max_range: int = 10_000_000) -> Path:
    """A powercap tree shaped like the kernel's: sub-zones inside their package, linked from the root."""
    package = root / "intel-rapl:0"
    package.mkdir(parents=True)
    (package / "name").write_text("package-0\n")
    (package / "energy_uj").write_text(f"{package_uj}\n")
    (package / "max_energy_range_uj").write_text(f"{max_range}\n")
    (package / "constraint_0_power_limit_uw").write_text("65000000\n")
    for sub, name, value in (("intel-rapl:0:0", "core", 300), ("intel-rapl:0:1", "dram", dram_uj)):
        zone = package / sub
        zone.mkdir()
        (zone / "name").write_text(f"{name}\n")
        (zone / "energy_uj").write_text(f"{value}\n")
        (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
        (root / sub).symlink_to(zone)
    return root


def set_counter(root: Path, zone: str, value: int) -> None:
    path = root / "intel-rapl:0" / "energy_uj" if zone == "package" else root / "intel-rapl:0:1" / "energy_uj"
    path.write_text(f"{value}\n")


class FakeNvml:
    """The slice of pynvml the meter and the hardware profile use."""

    def __init__(self, energy_mj: list[int], memory: list[tuple[int, int]] | None = None) -> None:
        self.energy_mj = energy_mj
        self.memory = memory or [(80 * 2**30, 70 * 2**30)] * len(energy_mj)

    def nvmlDeviceGetCount(self) -> int:
        return len(self.energy_mj)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-000{handle}-aaaa"

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"Fake H100"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return self.energy_mj[handle]

    def nvmlDeviceGetMemoryInfo(self, handle: int):
        total, free = self.memory[handle]
        return type("Memory", (), {"total": total, "free": free, "used": total - free})()


class CpuClock:
    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds

    def __call__(self) -> float:
        return self.seconds


def test_rapl_reads_package_and_dram_but_not_their_subzones(tmp_path):
    root = make_powercap(tmp_path / "powercap")
    meter = EnergyMeter(powercap_root=root, use_nvml=False, cpu_time=CpuClock())
    meter.begin("train")
    set_counter(root, "package", 1_000 + 4_000_000)
    set_counter(root, "dram", 500 + 1_000_000)
    reading = meter.end("train")

    assert reading.method == "rapl"
    assert reading.joules == pytest.approx(5.0)
    assert {c.name: c.joules for c in reading.components} == pytest.approx(
        {"package-0": 4.0, "package-0/dram": 1.0}
    )
    assert all(c.method == "rapl" for c in reading.components)
    assert reading.reason is None


def test_rapl_counter_wrap_is_corrected(tmp_path):
    root = make_powercap(tmp_path / "powercap", package_uj=9_000_000, max_range=10_000_000)
    meter = EnergyMeter(powercap_root=root, use_nvml=False, cpu_time=CpuClock())
    meter.begin("train")
    set_counter(root, "package", 1_000_000)  # wrapped past 10_000_000
    reading = meter.end("train")
    assert reading.joules == pytest.approx(2.0)


def test_polling_keeps_a_long_window_correct_across_several_wraps(tmp_path):
    root = make_powercap(tmp_path / "powercap", package_uj=9_000_000, max_range=10_000_000)
    meter = EnergyMeter(powercap_root=root, use_nvml=False, cpu_time=CpuClock())
    meter.begin("train")
    set_counter(root, "package", 1_000_000)
    assert meter.snapshot("train") == pytest.approx(2.0)
    set_counter(root, "package", 8_000_000)
    meter.poll()
    set_counter(root, "package", 3_000_000)
    assert meter.end("train").joules == pytest.approx(14.0)


def test_rapl_unreadable_counter_falls_back_to_the_model_and_says_why(tmp_path):
    root = make_powercap(tmp_path / "powercap")
    for path in root.rglob("energy_uj"):
        path.unlink()
    clock = CpuClock(1.0)
    meter = EnergyMeter(powercap_root=root, use_nvml=False, cpu_time=clock, cores=13)
    meter.begin("train")
    clock.seconds = 3.0
    reading = meter.end("train")
    assert reading.method == "model"
    # The powercap power limit (65 W) still gives the TDP when energy_uj does not.
    assert reading.joules == pytest.approx(2.0 * 65 / 13)
    assert "RAPL" in reading.reason and "powercap limit" in reading.reason


def test_process_model_uses_configured_tdp_per_core_and_says_model(tmp_path):
    clock = CpuClock(10.0)
    meter = EnergyMeter(
        powercap_root=tmp_path / "none", use_nvml=False, cpu_time=clock, tdp_w=80.0, cores=8
    )
    with meter.window("validate") as window:
        clock.seconds = 22.5
    reading = window.reading
    assert reading.method == "model"
    assert reading.cpu_s == pytest.approx(12.5)
    assert reading.joules == pytest.approx(125.0)  # 12.5 CPU-s x 10 W per core
    assert [(c.name, c.method) for c in reading.components] == [("cpu", "model")]
    assert "CPU modelled" in reading.reason and "80 W / 8 cores" in reading.reason


def test_tdp_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NEURONS_CPU_TDP_W", "120")
    model = CpuPowerModel.resolve(cores=4, powercap_root=tmp_path / "none")
    assert model.watts_per_core == pytest.approx(30.0)
    assert "NEURONS_CPU_TDP_W" in model.source


def test_no_source_gives_null_with_a_reason_never_zero(tmp_path):
    meter = EnergyMeter(powercap_root=tmp_path / "none", use_nvml=False, use_model=False)
    with meter.window("train") as window:
        pass
    reading = window.reading
    assert reading.joules is None
    assert reading.joules != 0
    assert "no powercap tree" in reading.reason
    assert meter.snapshot() is None
    data = reading.to_dict()
    assert data["joules"] is None and data["reason"]


def test_counter_lost_mid_window_gives_null_not_a_partial_sum(tmp_path):
    root = make_powercap(tmp_path / "powercap")
    meter = EnergyMeter(powercap_root=root, use_nvml=False, cpu_time=CpuClock())
    meter.begin("train")
    (root / "intel-rapl:0:1" / "energy_uj").unlink()
    reading = meter.end("train")
    assert reading.joules is None
    assert "incomplete" in reading.reason and "dram" in reading.reason
    dram = next(c for c in reading.components if c.name == "package-0/dram")
    assert dram.joules is None and dram.reason


def test_nvml_counts_only_visible_gpus_and_models_the_cpu(tmp_path):
    nvml = FakeNvml([1_000, 5_000])
    clock = CpuClock()
    meter = EnergyMeter(
        powercap_root=tmp_path / "none",
        nvml=nvml,
        cuda_visible_devices="1",
        cpu_time=clock,
        tdp_w=10.0,
        cores=1,
    )
    meter.begin("train")
    nvml.energy_mj[0] += 99_000  # another job's GPU
    nvml.energy_mj[1] += 250_000
    clock.seconds = 2.0
    reading = meter.end("train")
    parts = {c.name: (c.joules, c.method) for c in reading.components}
    assert parts == {"gpu1": (pytest.approx(250.0), "nvml"), "cpu": (pytest.approx(20.0), "model")}
    assert reading.joules == pytest.approx(270.0)
    # Part of the total is estimated, so the total is labelled an estimate.
    assert reading.method == "model"


def test_rapl_and_nvml_together_are_measured(tmp_path):
    root = make_powercap(tmp_path / "powercap")
    nvml = FakeNvml([0])
    meter = EnergyMeter(powercap_root=root, nvml=nvml, cuda_visible_devices=None, cpu_time=CpuClock())
    meter.begin("train")
    nvml.energy_mj[0] += 3_000
    set_counter(root, "package", 1_000 + 2_000_000)
    reading = meter.end("train")
    assert reading.method == "rapl"
    assert reading.joules == pytest.approx(5.0)
    assert "cpu" not in {c.name for c in reading.components}


def test_cuda_visible_devices_forms():
    nvml = FakeNvml([0, 0, 0])
    assert [label for label, _ in visible_gpu_handles(nvml, None)] == ["gpu0", "gpu1", "gpu2"]
    assert visible_gpu_handles(nvml, "") == []
    assert visible_gpu_handles(nvml, "-1") == []
    assert [label for label, _ in visible_gpu_handles(nvml, "2,0")] == ["gpu2", "gpu0"]
    # CUDA stops at the first entry it cannot resolve.
    assert [label for label, _ in visible_gpu_handles(nvml, "1,7,0")] == ["gpu1"]
    assert [label for label, _ in visible_gpu_handles(nvml, "GPU-0002")] == ["gpu2"]


def test_windows_nest_and_snapshots_report_energy_so_far(tmp_path):
    clock = CpuClock()
    meter = EnergyMeter(powercap_root=tmp_path / "none", use_nvml=False, cpu_time=clock, tdp_w=1.0, cores=1)
    meter.begin("cycle")
    clock.seconds = 1.0
    with meter.window("train") as train:
        clock.seconds = 4.0
        assert train.so_far() == pytest.approx(3.0)
        assert meter.snapshot("cycle") == pytest.approx(4.0)
    clock.seconds = 5.0
    cycle = meter.end("cycle")
    assert train.reading.joules == pytest.approx(3.0)
    assert cycle.joules == pytest.approx(5.0)
    assert meter.snapshot() == pytest.approx(5.0)
    assert meter.readings["train"] is train.reading


def test_window_misuse_is_an_error(tmp_path):
    meter = EnergyMeter(powercap_root=tmp_path / "none", use_nvml=False)
    meter.begin("train")
    with pytest.raises(ValueError, match="already open"):
        meter.begin("train")
    with pytest.raises(ValueError, match="never begun"):
        meter.end("validate")
    with pytest.raises(ValueError, match="not open"):
        meter.snapshot("validate")


def test_reading_round_trips_through_a_dict(tmp_path):
    clock = CpuClock()
    meter = EnergyMeter(powercap_root=tmp_path / "none", use_nvml=False, cpu_time=clock, tdp_w=2.0, cores=1)
    with meter.window("train") as window:
        clock.seconds = 1.5
    data = window.reading.to_dict()
    assert set(data) >= {"joules", "method", "components", "duration_s", "cpu_s", "reason"}
    assert data["components"] == [{"name": "cpu", "joules": 3.0, "method": "model"}]
    assert Reading.from_dict(data) == window.reading


def test_unavailable_reading_is_null_with_reason():
    reading = Reading.unavailable("meter crashed", duration_s=3.0)
    assert reading.joules is None and reading.wh is None
    assert reading.to_dict()["reason"] == "meter crashed"


def test_meter_overhead_is_small_on_the_real_machine():
    meter = EnergyMeter()
    fraction = measure_overhead(lambda: sum(range(200_000)), steps=20, meter=meter)
    assert 0 <= fraction < 0.5
    assert not any(name.startswith("__overhead") for name in meter.readings)


def test_rapl_source_without_a_tree_says_so(tmp_path):
    source = RaplSource(tmp_path / "missing")
    assert not source.available
    assert "no powercap tree" in source.unavailable_reason
    assert os.fspath(tmp_path) in source.unavailable_reason
