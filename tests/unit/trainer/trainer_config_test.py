"""Training configurations from event payloads, and the fallback artefact's determinism."""

from __future__ import annotations

import json
import struct

import pytest

from shared.ml.config import MntpConfig, RlConfig
from shared.ml.fallback import write_fallback_artefact


def test_configs_ignore_unknown_keys_and_check_values():
    config = MntpConfig.from_dict({"steps": 3, "mask_ratio": 0.3, "population_rank": 7})
    assert (config.steps, config.mask_ratio) == (3, 0.3)
    assert MntpConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        MntpConfig.from_dict({"mask_ratio": 1.5})
    with pytest.raises(ValueError):
        RlConfig.from_dict({"group_size": 1})
    assert "lm_head" in RlConfig().target_modules


def test_where_a_run_computes_is_checked_without_torch():
    assert (MntpConfig().device, MntpConfig().precision) == ("auto", "auto")
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert MntpConfig.from_dict({"device": device, "precision": "bfloat16"}).device == device
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        MntpConfig.from_dict({"device": "gpu"})
    with pytest.raises(ValueError, match="device must be"):
        MntpConfig.from_dict({"device": "cuda:x"})
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, got 'float16'"):
        MntpConfig.from_dict({"precision": "float16"})


def _read_safetensors(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    return header, raw[8 + length :]


def test_fallback_bytes_depend_only_on_config_and_dataset(tmp_path):
    config = {"model": "smollm2", "lora_rank": 4, "target_modules": ["q_proj", "v_proj"], "kind": "mntp"}
    a = write_fallback_artefact(config, "1" * 64, tmp_path / "a", "torch missing")
    b = write_fallback_artefact(dict(reversed(list(config.items()))), "1" * 64, tmp_path / "b", "torch missing")
    c = write_fallback_artefact(config, "2" * 64, tmp_path / "c", "torch missing")
    files = lambda r: {p.name: p.read_bytes() for p in r.adapter_dir.iterdir()}  # noqa: E731
    assert files(a) == files(b)
    assert files(a)["adapter_model.safetensors"] != files(c)["adapter_model.safetensors"]
    assert a.status == "fallback" and a.fallback_reason == "torch missing"

    header, data = _read_safetensors(a.adapter_dir / "adapter_model.safetensors")
    assert header["__metadata__"]["neurons"].startswith("neurons-fallback")
    # SmolLM2: 30 layers x (q, v) x (A, B); q is 576 -> 576, v is 576 -> 192 (grouped-query attention).
    assert len(header) - 1 == 30 * 2 * 2
    assert header["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]["shape"] == [192, 4]
    assert header["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]["shape"] == [4, 576]
    end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    assert end == len(data)
    summary = json.loads((a.adapter_dir / "training_summary.json").read_text())
    assert summary["loadable"] is True and summary["dataset_sha256"] == "1" * 64
