"""Without torch, transformers or peft the trainer still completes, with a deterministic artefact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel

from shared.ml.fallback import ml_stack_available, write_fallback_artefact
from shared.ml.models import load_model

REPO = Path(__file__).resolve().parents[3]
CONFIG = {"model": "tiny", "steps": 20, "lora_rank": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "kind": "mntp"}
DATASET = "cd" * 32

# Runs in a fresh interpreter in which the ML stack cannot be imported.
HIDDEN_STACK = r"""
import importlib.abc, json, sys
from pathlib import Path

class HideMlStack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideMlStack())
from shared.ml.fallback import ml_stack_available, write_fallback_artefact

available, reason = ml_stack_available()
result = write_fallback_artefact(json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), reason)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
print(json.dumps({"available": available, "reason": reason, "status": result.status, "loaded": loaded}))
"""


def _run_without_ml_stack(out_dir: Path, config=CONFIG, dataset=DATASET) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", HIDDEN_STACK, json.dumps(config), dataset, str(out_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_two_runs_without_torch_write_identical_bytes(tmp_path):
    first = _run_without_ml_stack(tmp_path / "a")
    second = _run_without_ml_stack(tmp_path / "b")

    assert first["available"] is False and first["reason"].startswith("torch cannot be imported")
    assert first["status"] == "fallback" and first["loaded"] == []
    assert (second["status"], second["reason"]) == ("fallback", first["reason"])
    files = _files(tmp_path / "a" / "adapter")
    assert set(files) == {"adapter_model.safetensors", "adapter_config.json", "training_summary.json"}
    assert files == _files(tmp_path / "b" / "adapter")
    summary = json.loads(files["training_summary.json"])
    assert summary["status"] == "fallback" and summary["fallback_reason"] == first["reason"]
    assert summary["dataset_sha256"] == DATASET and summary["config"] == CONFIG

    # Other data, other bytes.
    _run_without_ml_stack(tmp_path / "c", dataset="ef" * 32)
    other = _files(tmp_path / "c" / "adapter")
    assert other["adapter_model.safetensors"] != files["adapter_model.safetensors"]


def test_fallback_adapter_loads_in_peft_and_changes_nothing(model_cache, tmp_path):
    assert ml_stack_available() == (True, None)
    result = write_fallback_artefact(CONFIG, DATASET, tmp_path, "test: forced fallback")
    base = load_model("tiny", model_cache).model.eval()
    ids = torch.tensor([[101, 202, 303, 404, 505]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    lora_a = [p for n, p in adapted.named_parameters() if "lora_A" in n]
    assert len(lora_a) == 2 * 2 and all(p.abs().sum() > 0 for p in lora_a)
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids).logits, expected)
