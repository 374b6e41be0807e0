"""The deterministic fallback artefact, for nodes without torch, transformers or peft.

A job still completes, visibly marked ``status: "fallback"`` with the reason,
and its artefact is a well-formed but inert LoRA adapter:

- ``adapter_model.safetensors`` is written by hand in the safetensors format
  (8-byte little-endian header length, JSON header, raw float32 data). For a
  Llama-shaped base model it holds the LoRA tensors peft would save
  (``base_model.model.model.layers.<i>.self_attn.<m>.lora_A.weight`` ...):
  ``lora_A`` pseudo-random from ``sha256(config + dataset sha256)`` and
  ``lora_B`` zero, so loading it changes no output. For other models it holds
  one vector ``neurons.fallback.vector`` and cannot be loaded by peft.
- ``adapter_config.json`` is the matching peft LoRA config.
- ``training_summary.json`` has the config, dataset sha256, status, reason and
  whether peft can load the adapter; no timings, so the whole folder is
  byte-identical for equal inputs (and the same reason).

Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import struct
from pathlib import Path
from typing import Any

from shared.ml.models import architecture
from shared.ml.result import ADAPTER_DIR, TrainingResult, write_summary

FORMAT = "neurons-fallback/1"
ML_MODULES = ("torch", "transformers", "peft")
_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP = {"gate_proj", "up_proj", "down_proj"}


def ml_stack_available() -> tuple[bool, str | None]:
    """Whether torch, transformers and peft import; else the first failure as the reason."""
    for name in ML_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken install raises more than ImportError
            return False, f"{name} cannot be imported: {type(exc).__name__}: {exc}"
    return True, None


def fallback_seed(config: dict[str, Any], dataset_sha256: str | None) -> bytes:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{FORMAT}\n{canonical}\n{dataset_sha256 or ''}".encode()).digest()


def write_fallback_artefact(
    config_dict: dict[str, Any], dataset_sha256: str | None, out_dir: Path, reason: str
) -> TrainingResult:
    """Write the fallback adapter into ``out_dir/adapter``; its bytes depend only on the inputs."""
    config = dict(config_dict)
    seed = fallback_seed(config, dataset_sha256)
    rng = random.Random(int.from_bytes(seed, "big"))
    model = str(config.get("model", "tiny"))
    rank = int(config.get("lora_rank", 8))
    alpha = config.get("lora_alpha", 16)
    targets = sorted(config.get("target_modules") or ["q_proj", "k_proj", "v_proj", "o_proj"])
    kind = str(config.get("kind", "mntp"))

    shapes = _lora_shapes(model, rank, targets)
    tensors: dict[str, tuple[list[int], bytes]] = {}
    if shapes is not None:
        for name, (shape, fan_in) in shapes.items():
            count = shape[0] * shape[1]
            if ".lora_A." in name:
                # peft's own lora_A init range (kaiming uniform, a=sqrt(5)).
                bound = 1.0 / fan_in**0.5
                values = [rng.uniform(-bound, bound) for _ in range(count)]
                tensors[name] = (shape, struct.pack(f"<{count}f", *values))
            else:
                tensors[name] = (shape, bytes(4 * count))
    else:
        values = [rng.gauss(0.0, 1.0) for _ in range(64)]
        tensors["neurons.fallback.vector"] = ([64], struct.pack("<64f", *values))

    adapter_dir = Path(out_dir) / ADAPTER_DIR
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "adapter_model.safetensors").write_bytes(_safetensors_bytes(tensors, {"format": "pt", "neurons": FORMAT}))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": config.get("lora_dropout", 0.0),
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    summary = {
        "kind": kind,
        "status": "fallback",
        "fallback_reason": reason,
        "format": FORMAT,
        "loadable": shapes is not None,  # peft can load it onto the base model
        "config": config,
        "dataset_sha256": dataset_sha256,
        "base_model": {"name": model, "checksum": None},
        "metrics": {"before": None, "after": None},
        "loss_curve": [],
        "energy": None,
        "seed_sha256": seed.hex(),
    }
    write_summary(adapter_dir, summary)
    return TrainingResult(
        kind=kind,
        status="fallback",
        adapter_dir=adapter_dir,
        summary=summary,
        metrics=summary["metrics"],
        base_model=summary["base_model"],
        fallback_reason=reason,
    )


def _lora_shapes(model: str, rank: int, targets: list[str]) -> dict[str, tuple[list[int], int]] | None:
    """peft tensor names and shapes for a Llama-shaped model, or None when unknown."""
    try:
        arch = architecture(model)
    except (FileNotFoundError, ValueError, OSError):
        return None
    if arch.get("model_type") not in ("llama", "mistral", "qwen2") or not set(targets) <= _ATTENTION | _MLP | {"lm_head"}:
        return None
    hidden = int(arch["hidden_size"])
    heads = int(arch["num_attention_heads"])
    head_dim = int(arch.get("head_dim") or hidden // heads)
    kv = int(arch.get("num_key_value_heads") or heads)
    inter = int(arch["intermediate_size"])
    dims = {  # module: (in_features, out_features)
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    shapes: dict[str, tuple[list[int], int]] = {}
    for layer in range(int(arch["num_hidden_layers"])):
        for module in targets:
            if module == "lm_head":
                continue
            block = "self_attn" if module in _ATTENTION else "mlp"
            fan_in, fan_out = dims[module]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = ([rank, fan_in], fan_in)
            shapes[f"{prefix}.lora_B.weight"] = ([fan_out, rank], rank)
    if "lm_head" in targets:
        shapes["base_model.model.lm_head.lora_A.weight"] = ([rank, hidden], hidden)
        shapes["base_model.model.lm_head.lora_B.weight"] = ([int(arch["vocab_size"]), rank], rank)
    return shapes


def _safetensors_bytes(tensors: dict[str, tuple[list[int], bytes]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(tensors):
        shape, data = tensors[name]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(tensors[n][1] for n in sorted(tensors))
