"""Learning quality: does training improve what it should, and does the validator refuse what it should?

Four figures, each with its sample size, all on one model (SmolLM2 by default,
the tiny random model with --quick) and the demo's text (clean paragraphs of
the standard library's docstrings), split as the trainer splits it:

* ``learning.mntp_loss``: the held-out masked-token loss after ``mntp_steps``
  MNTP steps against the same loss of the base model, on the same held-out
  texts and masks (``evaluate_mntp``; the samples are the masked tokens
  scored: 35 % of 480 paragraphs, over 2,000 masked tokens). Target: at least 25 % lower.
* ``learning.mntp_retrieval``: the encoder's recall@1 on held-out pairs (first
  and second half of the same paragraph, ``services.validator.retrieval``),
  mean-pooled bidirectional embeddings of the adapter against the base model's.
  Target: at least 10 % higher.
* ``learning.rl_reward``: the mean verifiable reward (``length_target`` on its
  own prompt set) of sampled completions after ``rl_steps`` GRPO steps, with
  the settings a research loop gets by default (``RESEARCH_CONFIG``), against
  before them, same prompts and sampling seed. Target: at least 30 % higher.
* ``learning.validator_corrupted``: the validator's judgement
  (``services.validator.judgement.judge_run``, default thresholds) of soaks
  whose candidate is the trained MNTP adapter with Gaussian noise added to its
  LoRA weights (each tensor's noise ``NOISE_SCALE`` times its own RMS), one
  seed per try, against the clean adapter in production (what a corrupted copy
  of it would face); and of the clean adapter against the base model. Noise on
  the two LoRA factors adds to their product instead of removing it, so a
  copy with noise of one or three times the RMS keeps what the adapter learned
  (SmolLM2: held-out loss within 2 % of the clean adapter's) and the
  validator rightly finds it the same; at ten times the learned gain is gone.
  A few copies at ``MILD_NOISE_SCALE`` are reported beside the figure, outside
  its target.
  The episodes are the soak replica's own (masked-token loss and accuracy on
  the held-out texts with the episode's masks, retrieval on its pairs), run in
  this process. Target: every corrupted adapter rejected (verdict fail), every
  clean one passed.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.figure import Figure, ratio

NAMES = ("learning.mntp_loss", "learning.mntp_retrieval", "learning.rl_reward", "learning.validator_corrupted")
TARGET_LOSS = 0.75  # held-out loss after / before
TARGET_RECALL = 1.10  # recall@1 adapter / base
TARGET_REWARD = 1.30  # mean reward after / before
TARGETS = {"learning.mntp_loss": f"ratio <= {TARGET_LOSS}", "learning.mntp_retrieval": f"ratio >= {TARGET_RECALL}",
           "learning.rl_reward": f"ratio >= {TARGET_REWARD}",
           "learning.validator_corrupted": "100% of corrupted rejected, clean passed"}
UNITS = {"learning.mntp_loss": "nats", "learning.mntp_retrieval": "recall@1", "learning.rl_reward": "reward",
         "learning.validator_corrupted": "share rejected"}
NOISE_SCALE = 10.0  # noise RMS / the LoRA tensor's own RMS: a copy whose learned gain is gone
MILD_NOISE_SCALE = 3.0  # noise that leaves the gain: reported, not judged against the target


@dataclass(frozen=True)
class LearningSizes:
    model: str
    records: int  # paragraphs of the dataset
    eval_fraction: float  # held out, as the trainer splits
    mntp_steps: int
    retrieval_pairs: int
    rl_steps: int
    corrupted_tries: int
    clean_tries: int
    soak_episodes: int  # per side per soak, in two cycles


DEFAULT = LearningSizes(model="smollm2", records=480, eval_fraction=0.35, mntp_steps=100, retrieval_pairs=64,
                        rl_steps=50, corrupted_tries=10, clean_tries=2, soak_episodes=20)
QUICK = LearningSizes(model="tiny", records=48, eval_fraction=0.25, mntp_steps=4, retrieval_pairs=8, rl_steps=2,
                      corrupted_tries=2, clean_tries=1, soak_episodes=20)


def measure(cache_dir: Path, sizes: LearningSizes) -> list[Figure]:
    from shared.ml import build_demo_dataset, load_jsonl, split_held_out

    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        dataset = build_demo_dataset(Path(tmp) / "paragraphs.jsonl", records=sizes.records)
        texts = load_jsonl(Path(dataset["path"]))
        trained, tokenizer, config = _train_mntp(cache_dir, sizes, texts, Path(tmp) / "mntp")
        _, held_out = split_held_out(texts, config.eval_fraction, config.seed)
        figures = [_loss_figure(trained, sizes, len(held_out)),
                   _guarded("learning.mntp_retrieval", lambda: _retrieval_figure(trained.model, tokenizer, held_out,
                                                                                 sizes)),
                   _guarded("learning.validator_corrupted", lambda: _corruption_figure(trained.model, tokenizer,
                                                                                       held_out, config, sizes))]
        figures.insert(2, _guarded("learning.rl_reward", lambda: _rl_figure(cache_dir, sizes, Path(tmp) / "rl")))
    return figures


def _guarded(name: str, measure_one) -> Figure:
    try:
        return measure_one()
    except Exception as exc:  # one figure failing must not cost the others
        return Figure.failed(name, UNITS[name], TARGETS[name], exc)


# --- MNTP: the objective and the encoder -------------------------------------------------------


def _train_mntp(cache_dir: Path, sizes: LearningSizes, texts: list[str], out: Path):
    from shared.ml import MntpConfig, load_model, train_mntp

    config = MntpConfig(model=sizes.model, steps=sizes.mntp_steps, eval_fraction=sizes.eval_fraction,
                        checkpoint_every=0, progress_every=max(1, sizes.mntp_steps // 5))
    result = train_mntp(config, texts, out, cache_dir)
    return result, load_model(sizes.model, cache_dir).tokenizer, config


def _loss_figure(trained, sizes: LearningSizes, held_out_texts: int) -> Figure:
    before, after = trained.metrics["before"], trained.metrics["after"]
    r = ratio(after["loss"], before["loss"])
    return Figure(
        name="learning.mntp_loss", value=after["loss"], unit="nats", baseline=before["loss"], ratio=r,
        target=TARGETS["learning.mntp_loss"], passed=r is not None and r <= TARGET_LOSS, samples=int(after["tokens"]),
        notes=(f"held-out masked-token loss after {sizes.mntp_steps} MNTP steps on {sizes.model} "
               f"(rank {trained.summary['lora'].get('rank', '?')}, lr {trained.summary['config']['learning_rate']}) "
               f"against the base model, same {held_out_texts} held-out texts and masks, "
               f"{int(after['tokens'])} masked tokens; accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}; "
               f"relative change {(r - 1) * 100:+.1f}%" if r is not None else "no loss measured"),
        extra={"model": sizes.model, "steps": sizes.mntp_steps, "accuracy_before": before["accuracy"],
               "accuracy_after": after["accuracy"], "held_out_texts": held_out_texts},
    )


def _retrieval(model: Any, tokenizer: Any, pairs: list[tuple[str, str]]) -> dict[str, float]:
    from services.validator.retrieval import cosine_matrix, retrieval_scores
    from shared.ml import embed_texts

    vectors, _ = embed_texts(model, tokenizer, [q for q, _ in pairs] + [d for _, d in pairs], max_length=128,
                             batch_size=8)
    return retrieval_scores(cosine_matrix(vectors[: len(pairs)], vectors[len(pairs):]))


def _retrieval_figure(model: Any, tokenizer: Any, held_out: list[str], sizes: LearningSizes) -> Figure:
    from services.validator.retrieval import MRR, RECALL, retrieval_pairs

    pairs = retrieval_pairs(held_out)[: sizes.retrieval_pairs]
    adapter = _retrieval(model, tokenizer, pairs)
    with model.disable_adapter():
        base = _retrieval(model, tokenizer, pairs)
    r = ratio(adapter[RECALL], base[RECALL])
    return Figure(
        name="learning.mntp_retrieval", value=adapter[RECALL], unit="recall@1", baseline=base[RECALL], ratio=r,
        target=TARGETS["learning.mntp_retrieval"], passed=r is not None and r >= TARGET_RECALL, samples=len(pairs),
        notes=(f"recall@1 of the first half of each held-out paragraph finding its own second half among "
               f"{len(pairs)}, mean-pooled bidirectional embeddings of the MNTP adapter against the base model; "
               f"MRR {base[MRR]:.3f} -> {adapter[MRR]:.3f}"),
        extra={"mrr": adapter[MRR], "mrr_base": base[MRR], "pairs": len(pairs)},
    )


# --- RL: a verifiable reward -------------------------------------------------------------------


def _rl_figure(cache_dir: Path, sizes: LearningSizes, out: Path) -> Figure:
    from services.evolution.search import RESEARCH_CONFIG
    from shared.ml import RlConfig, reward_prompts, train_rl

    # the settings a research loop gets by default: learning rate, KL to the starting policy, clipping
    research = {k: v for k, v in RESEARCH_CONFIG.items() if k != "steps"}
    config = RlConfig(model=sizes.model, steps=sizes.rl_steps, reward="length_target", checkpoint_every=0, **research)
    result = train_rl(config, reward_prompts("length_target"), out, cache_dir)
    before, after = result.metrics["before"], result.metrics["after"]
    r = ratio(after["reward_mean"], before["reward_mean"])
    spread = f"spread {before['reward_std']:.3f} -> {after['reward_std']:.3f}"
    return Figure(
        name="learning.rl_reward", value=after["reward_mean"], unit="reward", baseline=before["reward_mean"], ratio=r,
        target=TARGETS["learning.rl_reward"], passed=r is not None and r >= TARGET_REWARD,
        samples=int(after["samples"]),
        notes=(f"mean length_target reward of {int(after['samples'])} sampled completions on the reward's own "
               f"prompts, after {sizes.rl_steps} GRPO steps on {sizes.model} (lr {config.learning_rate}, "
               f"KL beta {config.kl_beta}, clip {config.clip_eps}, {config.policy_updates} updates per rollout, "
               f"evolution's research defaults) against before, same prompts and "
               f"sampling seed; {spread}"),
        extra={"model": sizes.model, "steps": sizes.rl_steps, "reward_std_before": before["reward_std"],
               "reward_std_after": after["reward_std"],
               **{k: after[k] for k in ("distinct_share", "kl") if k in after}},
    )


# --- the validator against corrupted adapters --------------------------------------------------


def _corruption_figure(model: Any, tokenizer: Any, held_out: list[str], config: Any, sizes: LearningSizes) -> Figure:
    import torch

    from services.validator.thresholds import Thresholds

    thresholds = Thresholds.default()
    started = time.perf_counter()
    with model.disable_adapter():
        baseline = _episodes(model, tokenizer, held_out, config, sizes.soak_episodes)
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    original = {name: p.detach().clone() for name, p in lora.items()}
    # the clean adapter against the base model (its promotion), then in production: what a corrupted copy faces
    in_production = _episodes(model, tokenizer, held_out, config, sizes.soak_episodes)
    clean = [_verdict(in_production, baseline, thresholds) for _ in range(sizes.clean_tries)]

    def soak_noisy(scale: float, seed: int) -> tuple[str, float]:
        """The verdict on a copy with noise ``scale`` x each tensor's RMS, and its mean held-out loss."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in lora.items():
                rms = float(original[name].float().pow(2).mean().sqrt()) or 1e-3
                p.copy_(original[name] + torch.randn(p.shape, generator=generator).to(p) * rms * scale)
        episodes = _episodes(model, tokenizer, held_out, config, sizes.soak_episodes)
        return _verdict(episodes, in_production, thresholds), _mean_loss(episodes)

    try:
        corrupted, losses = zip(*(soak_noisy(NOISE_SCALE, seed) for seed in range(sizes.corrupted_tries)))
        mild, mild_losses = zip(*(soak_noisy(MILD_NOISE_SCALE, 1000 + seed) for seed in range(sizes.clean_tries)))
    finally:
        with torch.no_grad():
            for name, p in lora.items():
                p.copy_(original[name])
    corrupted, mild = list(corrupted), list(mild)
    rejected = sum(v == "fail" for v in corrupted) / len(corrupted)
    passed_clean = sum(v == "pass" for v in clean) / len(clean)
    loss_line = (f"held-out loss: base {_mean_loss(baseline):.2f}, clean {_mean_loss(in_production):.2f}, "
                 f"corrupted {min(losses):.2f}-{max(losses):.2f}, mild noise ({MILD_NOISE_SCALE:g}x) "
                 f"{min(mild_losses):.2f}-{max(mild_losses):.2f} judged {_tally(mild)}")
    return Figure(
        name="learning.validator_corrupted", value=rejected, unit="share rejected", baseline=None, ratio=None,
        target=TARGETS["learning.validator_corrupted"], passed=rejected == 1.0 and passed_clean == 1.0,
        samples=len(corrupted) + len(clean),
        notes=(f"{len(corrupted)} soaks of the MNTP adapter with Gaussian noise on its LoRA weights (noise RMS "
               f"{NOISE_SCALE:g} x each tensor's RMS, one seed per soak) against the clean adapter in production, "
               f"and {len(clean)} of the clean adapter against the base model: 2 cycles x {sizes.soak_episodes // 2} episodes per side, the "
               f"replica's episodes in this process, judged with the default thresholds; verdicts corrupted "
               f"{_tally(corrupted)}, clean {_tally(clean)}; {loss_line}; {time.perf_counter() - started:.0f}s"),
        extra={"corrupted_verdicts": corrupted, "clean_verdicts": clean, "noise_scale": NOISE_SCALE,
               "corrupted_losses": list(losses), "clean_loss": _mean_loss(in_production),
               "base_loss": _mean_loss(baseline), "mild_noise_scale": MILD_NOISE_SCALE, "mild_verdicts": mild,
               "mild_losses": list(mild_losses)},
    )


def _episodes(model: Any, tokenizer: Any, held_out: list[str], config: Any, episodes: int) -> list[dict[str, float]]:
    """What a soak replica measures per episode of an MNTP adapter: the masked-token loss and accuracy on
    the episode's texts and masks, and retrieval on its pairs (``services.validator.replica``)."""
    from services.validator.replica import RetrievalEpisodes
    from shared.ml import evaluate_mntp

    per_episode = 4
    retrieval = RetrievalEpisodes(held_out, {"max_length": config.max_length, "batch_size": 4})
    measured = []
    for index in range(episodes):
        start = (index * per_episode) % max(1, len(held_out))
        texts = (held_out[start:] + held_out[:start])[:per_episode]
        result = evaluate_mntp(model, tokenizer, texts, config.mask_ratio, index, config.max_length, 4)
        measured.append({"mntp_loss": result["loss"], "mntp_accuracy": result["accuracy"], "errors": 0.0,
                         **retrieval.episode(model, tokenizer, index)})
    return measured


def _mean_loss(episodes: list[dict[str, float]]) -> float:
    return sum(e["mntp_loss"] for e in episodes) / len(episodes)


def _verdict(candidate: list[dict[str, float]], baseline: list[dict[str, float]], thresholds: Any) -> str:
    from services.validator.judgement import judge_run
    from services.validator.samples import CycleSamples

    half = len(candidate) // 2
    cycles = []
    for number, (lo, hi) in enumerate(((0, half), (half, len(candidate))), start=1):
        replicas = [{"replica_id": f"{side}-0", "side": side, "incident": None,
                     "samples": {metric: [e[metric] for e in episodes[lo:hi] if metric in e]
                                 for metric in episodes[0]}}
                    for side, episodes in (("candidate", candidate), ("baseline", baseline))]
        cycles.append(CycleSamples.from_raw({"cycle": number, "replicas": replicas}))
    return judge_run(cycles, thresholds, kind="mntp").outcome


def _tally(verdicts: list[str]) -> str:
    return ", ".join(f"{verdicts.count(v)} {v}" for v in ("pass", "inconclusive", "fail") if verdicts.count(v)) or "none"
