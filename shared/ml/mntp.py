"""Masked next-token prediction (MNTP) with LoRA, as in LLM2Vec.

A share of the tokens (``mask_ratio``) is replaced by the mask token; the model
attends bidirectionally and predicts the original token i from its output at
position i-1, so the loss covers masked positions only. ``evaluate_mntp`` scores
any model (base, adapter) on held-out text the same way; the validator reuses it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from shared.ml.checkpoint import checkpoint_adapter, load_checkpoint, resume, save_checkpoint
from shared.ml.config import MntpConfig
from shared.ml.lora import attach_configured_lora, lora_settings
from shared.ml.models import load_model, mask_token_id, offline, torch_threads
from shared.ml.placement import Placement, model_device, place, resolve, summary_line
from shared.ml.result import TrainingResult, finish_trained

__all__ = [
    "MntpConfig",
    "MaskedBatches",
    "bidirectional_mask",
    "encode_texts",
    "evaluate_mntp",
    "logits_at",
    "mask_tokens",
    "predicted_positions",
    "train_mntp",
]

log = logging.getLogger("neurons.trainer.mntp")

Progress = Callable[[dict[str, Any]], None]
IGNORE = -100


# --- attention and masking ---------------------------------------------------


def bidirectional_mask(attention_mask: torch.Tensor, eager: bool = False) -> torch.Tensor:
    """A (B, 1, L, L) mask letting every position see every real token.

    Padded keys are hidden; padded queries still see the real tokens, because a
    query row with no visible key makes SDPA return NaN, which would then leak
    into real positions through the padded values of the next layer.
    """
    batch, length = attention_mask.shape
    keys = attention_mask.bool()[:, None, None, :].expand(batch, 1, length, length)
    if not eager:
        return keys
    # The eager kernel adds the mask to the scores instead of selecting with it.
    additive = torch.zeros(keys.shape, dtype=torch.float32, device=attention_mask.device)
    return additive.masked_fill(~keys, torch.finfo(torch.float32).min)


def mask_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_id: int, ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ~``ratio`` of the predictable tokens by ``mask_id``; labels are -100 elsewhere.

    Position 0 has no left neighbour to predict it from, so it is never masked;
    every row with something to mask gets at least one masked token.
    """
    eligible = attention_mask.bool().clone()
    eligible[:, 0] = False
    noise = torch.rand(input_ids.shape, generator=generator).masked_fill_(~eligible, 2.0)
    chosen = noise < ratio
    empty = ~chosen.any(dim=1) & eligible.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().squeeze(1)
        chosen[rows, noise[rows].argmin(dim=1)] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    return input_ids.masked_fill(chosen, mask_id), labels


def predicted_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every masked position i (row-major), the flat index of position i-1 in the (B, L) grid
    of the model's outputs, and the token to predict there."""
    targets = labels[:, 1:]
    selected = targets != IGNORE
    rows, columns = selected.nonzero(as_tuple=True)
    return rows * labels.shape[1] + columns, targets[selected]


def logits_at(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """Float32 logits at ``positions``, flat indices into the (B, L) grid (``predicted_positions``).

    Gathering by index rather than by a boolean mask keeps the step free of
    host syncs on a GPU: a mask's selection has to wait for the device to
    count what it selects; indices computed on the host do not.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    eager = getattr(base.config, "_attn_implementation", "sdpa") == "eager"
    mask = bidirectional_mask(attention_mask, eager=eager)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    if decoder is not None and head is not None:
        # Projecting only the masked positions onto the vocabulary skips most of
        # the output head's work (the head is a fifth of SmolLM2's compute).
        hidden = decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        logits = head(hidden.flatten(0, 1).index_select(0, positions))
    else:
        logits = model(input_ids=input_ids, attention_mask=mask).logits.flatten(0, 1).index_select(0, positions)
    return logits.float()


# --- data --------------------------------------------------------------------


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per window of at most ``max_length`` tokens; long texts become several windows."""
    sequences: list[list[int]] = []
    for ids in tokenizer(list(texts))["input_ids"]:
        windows = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
        # A short tail window has too little context to be worth a batch row.
        sequences.extend(w for j, w in enumerate(windows) if len(w) >= 2 and (j == 0 or len(w) >= 8))
    if not sequences:
        raise ValueError("no text with at least two tokens to train or evaluate on")
    return sequences


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tokens: int  # real (unpadded) tokens
    positions: torch.Tensor  # where the masked tokens are predicted (``predicted_positions``)
    targets: torch.Tensor  # the masked tokens, in the same order

    def to(self, device: torch.device) -> "Batch":
        """The batch on ``device`` (itself when it is there already). Batches are built on the host;
        to a GPU they go from pinned memory without waiting, so the host builds the next one meanwhile."""
        if self.input_ids.device == device:
            return self
        pinned = device.type == "cuda"

        def move(tensor: torch.Tensor) -> torch.Tensor:
            return (tensor.pin_memory() if pinned else tensor).to(device, non_blocking=pinned)

        return Batch(move(self.input_ids), move(self.attention_mask), self.tokens, move(self.positions),
                     move(self.targets))

    def logits(self, model: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at positions i-1 for every masked position i of the batch, and the tokens to predict."""
        return logits_at(model, self.input_ids, self.attention_mask, self.positions), self.targets


class MaskedBatches:
    """Batch k of a run, computed from k alone: order and masks are seeded per batch.

    That makes a resumed run see exactly the batches the uninterrupted run would.
    """

    def __init__(
        self,
        sequences: list[list[int]],
        batch_size: int,
        pad_id: int,
        mask_id: int,
        mask_ratio: float,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        self.sequences = sequences
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.mask_id = mask_id
        self.mask_ratio = mask_ratio
        self.seed = seed
        self.shuffle = shuffle
        self._orders: dict[int, list[int]] = {}

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.sequences) / self.batch_size)

    def batch(self, index: int) -> Batch:
        n = len(self.sequences)
        if self.shuffle:
            picks = [self._order(p // n)[p % n] for p in range(index * self.batch_size, (index + 1) * self.batch_size)]
        else:
            picks = list(range(index * self.batch_size, min(n, (index + 1) * self.batch_size)))
        rows = [self.sequences[i] for i in picks]
        lengths = [len(r) for r in rows]
        width = max(lengths)
        ids = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
        attention = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        masked, labels = mask_tokens(ids, attention, self.mask_id, self.mask_ratio, generator)
        return Batch(masked, attention, sum(lengths), *predicted_positions(labels))

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._orders[epoch] = torch.randperm(len(self.sequences), generator=generator).tolist()
        return self._orders[epoch]


def split_held_out(texts: Sequence[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split; both sides get at least one text when possible."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held = min(len(texts) - 1, max(1, round(len(texts) * eval_fraction))) if eval_fraction > 0 else 0
    if held <= 0:
        log.warning("no held-out text (%d records): evaluating on the training text", len(texts))
        return list(texts), list(texts)
    return [texts[i] for i in order[held:]], [texts[i] for i in order[:held]]


# --- evaluation --------------------------------------------------------------


@torch.no_grad()
def evaluate_mntp(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    mask_ratio: float = 0.2,
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 8,
) -> dict[str, float]:
    """Masked-token loss and accuracy on ``texts``, with masks fixed by ``seed``, on the model's device."""
    batches = MaskedBatches(
        encode_texts(tokenizer, texts, max_length),
        batch_size,
        tokenizer.pad_token_id,
        mask_token_id(tokenizer),
        mask_ratio,
        seed,
        shuffle=False,
    )
    was_training = model.training
    model.eval()
    device = model_device(model)
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for index in range(batches.batches_per_epoch):
            logits, targets = batches.batch(index).to(device).logits(model)
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == targets).sum())
            count += targets.numel()
    finally:
        model.train(was_training)
    return {"loss": loss_sum / count, "accuracy": correct / count, "tokens": count}


# --- training ----------------------------------------------------------------


class WarmupLinear:
    """Learning-rate factor: linear warm-up, then linear decay towards zero at the last step."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


class MntpLoop:
    """The optimiser steps of a run; kept free of per-step host work so it runs at bare-loop speed.

    It computes where the model's parameters are: each batch is built on the
    host (masked positions included) and copied there, and the loss is summed
    there, so on a GPU a step queues its work without waiting for the device
    and the host reads the loss back only for a progress report.
    """

    def __init__(
        self,
        model: Any,
        batches: MaskedBatches,
        config: MntpConfig,
        optimizer: Any = None,
        scheduler: Any = None,
    ) -> None:
        self.model = model
        self.batches = batches
        self.config = config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer or torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        self.scheduler = scheduler or torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupLinear(config.warmup_steps, config.steps)
        )
        self.tokens = 0
        self.device = model_device(model)

    def run(
        self,
        start: int,
        stop: int,
        report: Callable[[int, float, float, int, float], None] | None = None,
        checkpoint: Callable[[int], None] | None = None,
    ) -> None:
        """Steps ``start``..``stop-1``; ``report(step, loss, lr, tokens, seconds)`` every progress_every steps."""
        config = self.config
        model, optimizer, scheduler = self.model, self.optimizer, self.scheduler
        accum, device = config.grad_accum, self.device
        window_loss = torch.zeros((), device=device)
        window_steps, window_tokens, window_start = 0, self.tokens, time.perf_counter()
        for step in range(start, stop):
            for micro in range(accum):
                batch = self.batches.batch(step * accum + micro).to(device)
                logits, targets = batch.logits(model)
                loss = F.cross_entropy(logits, targets) / accum
                loss.backward()
                window_loss += loss.detach()
                self.tokens += batch.tokens
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window_steps += 1
            done = step + 1
            if report is not None and (done % config.progress_every == 0 or done == stop):
                # The only host sync of the loop: once per report window.
                seconds = time.perf_counter() - window_start
                report(done, float(window_loss) / window_steps, lr, self.tokens - window_tokens, seconds)
                window_loss = torch.zeros((), device=device)
                window_steps, window_tokens, window_start = 0, self.tokens, time.perf_counter()
            if checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                checkpoint(done)


def train_mntp(
    config: MntpConfig | dict[str, Any],
    texts: Sequence[str],
    out_dir: Path,
    cache_dir: Path,
    progress: Progress | None = None,
    resume_from: Path | None = None,
    warm_start_adapter: Path | None = None,
    dataset_sha256: str | None = None,
) -> TrainingResult:
    """Train a LoRA adapter by MNTP; the adapter and its summary land in ``out_dir/adapter``.

    ``resume_from`` is a checkpoint folder written by an earlier run with the
    same configuration; training continues at its step. ``warm_start_adapter``
    is an adapter folder to start from instead of a fresh LoRA.
    """
    config = config if isinstance(config, MntpConfig) else MntpConfig.from_dict(config)
    with torch_threads(config.model, config.threads):
        return _train_mntp(config, texts, out_dir, cache_dir, progress, resume_from, warm_start_adapter, dataset_sha256)


def _train_mntp(
    config: MntpConfig,
    texts: Sequence[str],
    out_dir: Path,
    cache_dir: Path,
    progress: Progress | None,
    resume_from: Path | None,
    warm_start_adapter: Path | None,
    dataset_sha256: str | None,
) -> TrainingResult:
    offline()
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no training text")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = f"model={config.model} dataset={(dataset_sha256 or '-')[:12]}"

    placement = resolve(config.device, config.precision)
    context += f" device={placement.device} precision={placement.precision}"
    loaded = load_model(config.model, cache_dir)
    tokenizer = loaded.tokenizer
    train_texts, eval_texts = split_held_out(texts, config.eval_fraction, config.seed)
    state = load_checkpoint(Path(resume_from)) if resume_from else None

    torch.manual_seed(config.seed)
    adapter_source = checkpoint_adapter(Path(resume_from)) if state else warm_start_adapter
    model = attach_configured_lora(place(loaded.model, placement), config, adapter_source)
    model.train()

    def evaluate() -> dict[str, float]:
        return evaluate_mntp(model, tokenizer, eval_texts, config.mask_ratio, config.seed, config.max_length, config.batch_size)

    before = state["extra"]["metrics_before"] if state else evaluate()
    log.info("mntp %s: held-out masked loss %.4f accuracy %.3f before training", context, before["loss"], before["accuracy"])

    loop = MntpLoop(model, _masked_batches(tokenizer, train_texts, config), config)
    run = _MntpRun(config, context, loop, before, placement, out_dir / "checkpoint", progress)
    if state:
        run.restore(state, resume_from)

    train_started = time.perf_counter()
    loop.run(run.start_step, config.steps, run.report, run.checkpoint)
    train_seconds = time.perf_counter() - train_started

    after = evaluate()
    log.info("mntp %s: held-out masked loss %.4f -> %.4f", context, before["loss"], after["loss"])
    return finish_trained(
        kind="mntp", model=model, out_dir=out_dir, config=config, lora=lora_settings(model),
        info=loaded.info, dataset_sha256=dataset_sha256,
        records={"train": len(train_texts), "held_out": len(eval_texts)}, before=before, after=after,
        curve=run.curve, tokens=run.tokens, placement=placement.describe(),
        tokens_per_s=loop.tokens / train_seconds if train_seconds > 0 else 0.0,
        duration_s=time.perf_counter() - started, resumed_from_step=run.start_step if state else None,
        warm_start=str(warm_start_adapter) if warm_start_adapter and not state else None,
    )


def _masked_batches(tokenizer: Any, train_texts: Sequence[str], config: MntpConfig) -> MaskedBatches:
    return MaskedBatches(
        encode_texts(tokenizer, train_texts, config.max_length),
        config.batch_size,
        tokenizer.pad_token_id,
        mask_token_id(tokenizer),
        config.mask_ratio,
        config.seed,
    )


@dataclass
class _MntpRun:
    """A run's record across steps and restarts: its curve, its tokens, its latest checkpoint."""

    config: MntpConfig
    context: str
    loop: MntpLoop
    before: dict[str, float]
    placement: Placement
    checkpoint_dir: Path
    progress: Progress | None
    start_step: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)
    prior_tokens: int = 0
    # The latest checkpoint, reported with progress.
    saved_step: int | None = None

    @property
    def tokens(self) -> int:
        """Tokens trained on, the checkpointed run before a resume included."""
        return self.prior_tokens + self.loop.tokens

    def restore(self, state: dict[str, Any], resume_from: Path | None) -> None:
        """Go on from a checkpoint: its step, optimiser, scheduler, curve and token count."""
        config, context, loop = self.config, self.context, self.loop
        self.start_step, changed = resume(state, loop.optimizer, loop.scheduler, config, self.placement.device)
        if changed:
            log.warning("mntp %s: resuming with a changed configuration (%s)", context, ", ".join(changed))
        was = state["extra"].get("placement")
        if was is not None and was != self.placement.describe():
            log.warning("mntp %s: checkpointed on %s, going on on %s: the rest of the run computes differently",
                        context, summary_line(was), summary_line(self.placement.describe()))
        self.saved_step = self.start_step
        self.curve = list(state["extra"]["curve"])
        self.prior_tokens = int(state["extra"]["tokens"])
        log.info("mntp %s: resuming at step %d of %d from %s", context, self.start_step, config.steps, resume_from)

    def report(self, step: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        config = self.config
        tokens_per_s = tokens / seconds if seconds > 0 else 0.0
        point = {"step": step, "loss": loss, "learning_rate": lr, "tokens_per_s": tokens_per_s}
        self.curve.append(point)
        log.info("mntp %s: step %d/%d loss %.4f lr %.2e %.0f tokens/s", self.context, step, config.steps, loss, lr,
                 tokens_per_s)
        if self.progress is not None:
            self.progress({**point, "total_steps": config.steps, "tokens": self.tokens,
                           "checkpoint_step": self.saved_step})

    def checkpoint(self, step: int) -> None:
        extra = {"metrics_before": self.before, "curve": self.curve, "tokens": self.tokens,
                 "config": self.config.to_dict(), "placement": self.placement.describe()}
        save_checkpoint(self.checkpoint_dir, self.loop.model, self.loop.optimizer, self.loop.scheduler, step, extra)
        self.saved_step = step
        log.info("mntp %s: checkpoint at step %d", self.context, step)
