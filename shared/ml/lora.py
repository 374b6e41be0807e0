"""LoRA adapters on a base model, via peft."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from shared.ml.config import adopt_adapter_shape
from shared.ml.placement import model_device

log = logging.getLogger("neurons.trainer.lora")


def attach_lora(
    model: Any,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    adapter_dir: Path | None = None,
) -> Any:
    """A trainable ``PeftModel``: a fresh LoRA, or the adapter in ``adapter_dir``.

    An existing adapter keeps its own rank, alpha and target modules (its
    ``adapter_config.json``); the ones given here only shape a fresh adapter.
    ``dropout`` is a training setting and applies to both.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    with warnings.catch_warnings():
        # Adapting the tied output head is intended (RL); the weights stay tied.
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        if adapter_dir is not None:
            saved = LoraConfig.from_pretrained(str(adapter_dir))
            saved.lora_dropout = float(dropout)
            # read straight onto the model's device (peft would read onto the first GPU by default)
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True, config=saved,
                                                   torch_device=str(model_device(model)))
            log.info("loaded adapter %s (rank %s) for further training", adapter_dir, saved.r)
        else:
            config = LoraConfig(
                r=int(rank),
                lora_alpha=alpha,
                lora_dropout=float(dropout),
                target_modules=list(target_modules),
                bias="none",
                task_type="CAUSAL_LM",
            )
            peft_model = get_peft_model(model, config)
    return peft_model


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The content of an adapter folder's ``adapter_config.json``."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: not a LoRA adapter")
    return json.loads(path.read_text())


def attach_configured_lora(model: Any, config: Any, adapter_dir: Path | None = None) -> Any:
    """``attach_lora`` with the rank, alpha, dropout and targets of a training config (MNTP or RL).

    When training continues ``adapter_dir``, ``config`` takes that adapter's
    rank, alpha and target modules first, so what the run records is what it trained.
    """
    if adapter_dir is not None:
        changed = adopt_adapter_shape(config, read_adapter_config(adapter_dir))
        if changed:
            log.info("continuing adapter %s with its own shape: %s", adapter_dir, ", ".join(changed))
    return attach_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                       target_modules=config.target_modules, adapter_dir=adapter_dir)


def lora_settings(peft_model: Any) -> dict[str, Any]:
    """The effective LoRA settings (a warm-started adapter may differ from the request)."""
    config = peft_model.peft_config["default"]
    return {
        "rank": int(config.r),
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules),
    }


def save_adapter(peft_model: Any, folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        # The base weights of an adapted output head are frozen: saving them
        # would only copy the base model's embedding into every adapter.
        peft_model.save_pretrained(str(folder), save_embedding_layers=False)
    # peft writes a model card template; the summary is the model card here.
    readme = Path(folder) / "README.md"
    if readme.exists():
        readme.unlink()
