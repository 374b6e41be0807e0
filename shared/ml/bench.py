"""Throughput of the MNTP training loop against a bare torch + peft loop.

Both loops train the same adapter on the same model, batch size and sequence
length in one process, one step each in turn; each side's speed is the median
over its steps, so a burst of other work on the machine hits neither. The
platform side runs ``MntpLoop`` (data pipeline, masking, clipping, scheduler,
progress reports); the bare side runs the same batches, built beforehand,
through forward, backward and an AdamW step.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shared.ml.config import MntpConfig
from shared.ml.lora import attach_configured_lora
from shared.ml.mntp import MaskedBatches, MntpLoop, bidirectional_mask
from shared.ml.models import load_model, mask_token_id, offline, torch_threads

log = logging.getLogger("neurons.trainer.bench")


class BareLoop:
    """The baseline of the trainer benchmarks: forward, backward and an AdamW step, nothing else.

    It trains on batches ``0..count-1`` of ``batches``, built beforehand (and
    moved to ``device`` when given), so it does the platform's work on the
    same data without building anything per step.
    """

    def __init__(self, peft_model: Any, batches: MaskedBatches, count: int, learning_rate: float,
                 device: Any = None) -> None:
        base = peft_model.get_base_model()
        self.decoder, self.head = base.get_decoder(), base.get_output_embeddings()
        self.prepared = []
        for index in range(count):
            built = batches.batch(index)
            tensors = (built.input_ids, bidirectional_mask(built.attention_mask), built.positions, built.targets)
            if device is not None:
                tensors = tuple(t.to(device) for t in tensors)
            self.prepared.append((*tensors, built.tokens))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)

    def step(self, index: int) -> int:
        """One step on batch ``index``; the tokens it trained on."""
        input_ids, mask, positions, targets, tokens = self.prepared[index]
        hidden = self.decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        loss = F.cross_entropy(self.head(hidden.flatten(0, 1).index_select(0, positions)).float(), targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return tokens


def bench_trainer(
    model: str = "tiny",
    steps: int = 40,
    batch: int = 8,
    seq_len: int = 64,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Tokens/s of the platform's training step and of a bare loop on the same batches, and their ratio."""
    with torch_threads(model) as threads:
        return {**_bench(model, steps, batch, seq_len, cache_dir), "threads": threads}


def _bench(model: str, steps: int, batch: int, seq_len: int, cache_dir: Path | None) -> dict[str, Any]:
    offline()
    cache_dir = Path(cache_dir or Path(os.environ.get("NEURONS_VAR", "var")) / "models")
    loaded = load_model(model, cache_dir)
    tokenizer = loaded.tokenizer
    config = MntpConfig(model=model, steps=steps + 1, batch_size=batch, max_length=seq_len, checkpoint_every=0)
    torch.manual_seed(config.seed)
    peft_model = attach_configured_lora(loaded.model, config)
    peft_model.train()

    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(3, len(tokenizer), (batch * 8, seq_len), generator=generator).tolist()
    batches = MaskedBatches(sequences, batch, tokenizer.pad_token_id, mask_token_id(tokenizer), config.mask_ratio, config.seed)
    loop = MntpLoop(peft_model, batches, config)

    # The bare loop gets the very batches the platform builds at each step, made
    # beforehand, so both do equal work (masked counts vary between batches).
    bare = BareLoop(peft_model, batches, steps + 1, config.learning_rate)

    def report(*_: Any) -> None:
        pass

    step = 0
    loop.run(step, step + 1, report)  # warm-up of both paths: first calls allocate
    bare.step(0)
    step += 1
    rates: dict[str, list[float]] = {"platform": [], "bare": []}
    for index in range(steps):
        # Alternate single steps and which side goes first, so slow patches of
        # a shared machine fall on both sides alike.
        for side in ("platform", "bare") if index % 2 == 0 else ("bare", "platform"):
            started = time.perf_counter()
            if side == "platform":
                tokens_before = loop.tokens
                loop.run(step, step + 1, report)
                tokens = loop.tokens - tokens_before
            else:
                tokens = bare.step(step)
            rates[side].append(tokens / (time.perf_counter() - started))
        step += 1

    # Medians: other processes on a shared machine slow down single steps.
    result = {
        "model": model,
        "batch": batch,
        "seq_len": seq_len,
        "steps": steps,
        "platform_tokens_per_s": statistics.median(rates["platform"]),
        "bare_tokens_per_s": statistics.median(rates["bare"]),
    }
    result["ratio"] = result["platform_tokens_per_s"] / result["bare_tokens_per_s"]
    log.info(
        "bench %s batch %d x %d: platform %.0f tokens/s, bare %.0f tokens/s, ratio %.3f",
        model, batch, seq_len, result["platform_tokens_per_s"], result["bare_tokens_per_s"], result["ratio"],
    )
    return result
