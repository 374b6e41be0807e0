"""Real LoRA adapters on the tiny model, for the runtime tests: built with peft, stored by sha256."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from shared.artefacts import ArtefactStore, StoredArtefact

PROBE = "The registry promotes"


def build_adapters(cache_dir: Path, out_dir: Path, store: ArtefactStore, seeds=(1, 2),
                   sign: Callable[[Path], Path] | None = None):
    """Adapters with random (non-zero) LoRA weights, each with the probe's logits as peft computes them;
    ``sign`` signs each as the trainer does (the runtime loads only signed adapters)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from shared.ml.models import load_model

    loaded = load_model("tiny", cache_dir)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    batch = tokenizer(PROBE, return_tensors="pt")
    with torch.no_grad():
        base_logits = model(**batch).logits[0, -1].tolist()
    adapters: list[tuple[StoredArtefact, list[float]]] = []
    for seed in seeds:
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                            task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        peft_model.eval()
        with torch.no_grad():
            logits = peft_model(**batch).logits[0, -1].tolist()
        folder = out_dir / f"adapter-{seed}"
        peft_model.save_pretrained(str(folder))
        model = peft_model.unload()  # the base model again, for the next adapter
        adapters.append((store.put_adapter(folder, sign=sign), logits))
    return base_logits, adapters
