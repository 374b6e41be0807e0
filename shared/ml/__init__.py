"""The model library: loading, MNTP, RL, LoRA save and load, evaluation, encoders.

This module is its public interface; everything outside ``shared/ml`` imports
from here, never from the modules behind it (an import-linter contract holds
that). Names resolve lazily, so importing ``shared.ml`` costs nothing and
works without torch: ``config``, ``placement``, ``models``, ``result``,
``rewards``, ``datasets`` and ``fallback`` need no ML stack; ``mntp``, ``rl``
and ``bench`` import torch when first used, ``lora`` and ``checkpoint`` when
called. Check ``ml_stack_available()`` first.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module behind it
_EXPORTS: dict[str, str] = {
    # data
    "DatasetError": "datasets", "build_demo_dataset": "datasets", "dataset_sha256": "datasets",
    "inspect_dataset": "datasets", "load_jsonl": "datasets",
    # configuration and placement
    "MntpConfig": "config", "RlConfig": "config",
    "place": "placement", "resolve": "placement", "summary_line": "placement",
    # models and adapters
    "load_model": "models", "mask_token_id": "models", "offline": "models", "torch_threads": "models",
    "attach_configured_lora": "lora",
    "CHECKPOINT_STATE_FILE": "checkpoint", "load_checkpoint": "checkpoint",
    # training and evaluation
    "ml_stack_available": "fallback", "write_fallback_artefact": "fallback",
    "train_mntp": "mntp", "evaluate_mntp": "mntp", "split_held_out": "mntp",
    "MaskedBatches": "mntp", "MntpLoop": "mntp", "bidirectional_mask": "mntp",
    "train_rl": "rl", "evaluate_policy": "rl", "get_reward": "rewards", "reward_prompts": "rewards",
    # measuring
    "bench_trainer": "bench", "BareLoop": "bench",
    # serving
    "embed_texts": "encoder",
}
_RENAMED = {"CHECKPOINT_STATE_FILE": "STATE_FILE"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shared.ml' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"shared.ml.{module}"), _RENAMED.get(name, name))
    globals()[name] = value
    return value
