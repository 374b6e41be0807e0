"""One soak replica in its own process: `python -m services.validator.replica SPEC.json`.

A replica loads the base model and its adapter through the shared adapter
runtime (the loader serving uses; the artefact's sha256 and the trainer's
signature over its folder are checked: a replica whose adapter fails the check
exits 1 with the reason, naming the file, as its last line of stderr), then runs
``cycles`` x ``episodes`` evaluation episodes and prints one JSON line per
cycle: ``{"event": "cycle", "cycle": c, "replica_id": ..., "side": ...,
"samples": {metric: [...]}, "load": {...}}``.

Episode metrics: ``mntp_loss`` and ``mntp_accuracy`` (held-out masked-token
prediction) and ``retrieval_recall_at_1`` and ``retrieval_mrr`` (the adapter as
an encoder, ``retrieval``) for MNTP adapters; ``reward`` (the reward the run
trained on, at its sampling settings), ``reward_spread`` and ``distinct_share``
(is the policy collapsing?) for RL adapters; always ``latency_ms``, ``rss_mb``
and ``errors``.
Episode k of every replica uses the same held-out texts and masks, so the two
sides answer the same questions.

Spec: replica_id, side, model, adapter_sha256, adapter_uri (null: the base model
alone), kind, cycles, first_cycle (the cycles a resumed soak already has),
episodes, cooldown_s, dataset_path ("" for an RL soak on the reward's own
prompts), eval (mask_ratio, max_length, batch_size, eval_fraction, seed,
texts_per_episode, retrieval_pairs; for RL: reward, reward_params, temperature,
max_new_tokens, group_size, prompts, prompt_set), latency_hold_ms
and latency_jitter_ms (fault injection, for chaos drills: every episode is held
``latency_hold_ms`` longer; with ``latency_jitter_ms`` the hold moves early and
late by turns, by a random half to all of the jitter, so the latency spread
widens while its median and mean stay where an unjittered replica with the same
hold has them).
"""

from __future__ import annotations

import json
import random
import sys
import time
import zlib
from pathlib import Path

from shared.processes import die_with_parent


def emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    die_with_parent()
    spec = json.loads(Path(argv[0]).read_text())
    import psutil
    import torch

    from shared.ml import load_jsonl
    from shared.ml import evaluate_mntp, split_held_out
    from shared.adapter_runtime import AdapterRuntime, Target
    from shared.adapter_signing import AdapterSignatureError
    from shared.settings import Settings

    torch.set_num_threads(1)  # replicas share the cores; one thread each keeps them fair
    settings = Settings.from_env()
    runtime = AdapterRuntime.load(settings, spec["model"])
    if spec.get("adapter_sha256"):
        try:  # the runtime checks the sha256 and the trainer's signature before it loads the adapter
            runtime.activate(Target(spec["adapter_sha256"], spec.get("adapter_uri"), f"soak {spec['replica_id']}"))
        except AdapterSignatureError as exc:  # the last line of stderr is the replica's incident
            sys.stderr.write(f"adapter signature check failed: {exc}\n")
            return 1
    model, tokenizer = runtime.model, runtime.tokenizer
    model.eval()
    ev = spec["eval"]
    held_out: list[str] = []
    if spec.get("dataset_path"):  # an RL soak without one samples the reward's own prompts
        _, held_out = split_held_out(load_jsonl(Path(spec["dataset_path"])), ev.get("eval_fraction", 0.1),
                                     ev.get("seed", 0))
    per_episode = int(ev.get("texts_per_episode", 4))
    process = psutil.Process()
    jitter_ms = float(spec.get("latency_jitter_ms") or 0.0)
    hold_ms = max(float(spec.get("latency_hold_ms") or 0.0), jitter_ms)  # no hold turns negative
    # crc32, not hash(): str hashes are salted per process, and a drill should replay
    jitter = random.Random(zlib.crc32(spec["replica_id"].encode()))
    if spec["kind"] == "rl":
        policy = PolicyEpisodes(spec, ev, held_out, per_episode)
    else:
        retrieval = RetrievalEpisodes(held_out, ev)

    first = int(spec.get("first_cycle", 0))  # a resumed soak continues the episode sequence
    for cycle in range(first, first + int(spec["cycles"])):
        samples: dict[str, list[float]] = {}
        for episode in range(int(spec["episodes"])):
            index = cycle * int(spec["episodes"]) + episode
            start = (index * per_episode) % max(1, len(held_out))
            texts = (held_out[start:] + held_out[:start])[:per_episode]
            began = time.perf_counter()
            errors = 0.0
            try:
                with torch.no_grad():
                    if spec["kind"] == "rl":
                        measured = policy.episode(model, tokenizer, index)
                    else:
                        result = evaluate_mntp(model, tokenizer, texts, ev.get("mask_ratio", 0.2), index,
                                               ev.get("max_length", 128), ev.get("batch_size", 4))
                        measured = {"mntp_loss": result["loss"], "mntp_accuracy": result["accuracy"],
                                    **retrieval.episode(model, tokenizer, index)}
                    for metric, value in measured.items():
                        samples.setdefault(metric, []).append(value)
            except Exception as exc:  # an episode that fails is data (errors), not the end of the soak
                errors = 1.0
                sys.stderr.write(f"episode {index} failed: {exc!r}\n")
            extra_ms = hold_ms
            if jitter_ms:  # early and late by turns: the spread widens, the median holds
                extra_ms += (1 if index % 2 else -1) * jitter_ms * jitter.uniform(0.5, 1.0)
            if extra_ms > 0:
                time.sleep(extra_ms / 1000.0)
            samples.setdefault("latency_ms", []).append((time.perf_counter() - began) * 1000.0)
            samples.setdefault("rss_mb", []).append(process.memory_info().rss / 2**20)
            samples.setdefault("errors", []).append(errors)
        load = {"rss_mb": process.memory_info().rss / 2**20, "cpu_percent": process.cpu_percent(interval=None),
                "latency_ms": sorted(samples["latency_ms"])[len(samples["latency_ms"]) // 2]}
        emit(event="cycle", cycle=cycle, replica_id=spec["replica_id"], side=spec["side"], samples=samples, load=load)
        if spec.get("cooldown_s"):
            time.sleep(float(spec["cooldown_s"]))
    return 0


class PolicyEpisodes:
    """An RL adapter's episodes: sampled completions scored by the reward the run trained on, at the
    temperature, completion length and (where the run named them) prompts it trained with."""

    def __init__(self, spec: dict, ev: dict, held_out: list[str], per_episode: int) -> None:
        from shared.ml import RlConfig, get_reward

        settings = {k: ev[k] for k in ("reward", "reward_params", "temperature", "max_new_tokens", "group_size")
                    if ev.get(k) is not None}
        self.config = RlConfig.from_dict({"model": spec["model"], "group_size": 4, **settings,
                                          "prompts_per_step": per_episode})
        self.score = get_reward(self.config.reward, **self.config.reward_params)
        self.prompts = rl_prompts(ev, held_out, self.config.reward)
        self.per_episode = per_episode

    def episode(self, model, tokenizer, index: int) -> dict[str, float]:
        """The mean reward, its spread over the episode's completions and the mean share of distinct
        completions per prompt (``shared.contracts.collapse``)."""
        from shared.contracts.collapse import distinct_share
        from shared.ml import evaluate_policy

        start = (index * self.per_episode) % len(self.prompts)
        chunk = (self.prompts[start:] + self.prompts[:start])[: self.per_episode]
        completions: list[str] = []

        def scored(prompt: str, completion: str) -> float:
            completions.append(completion)
            return self.score(prompt, completion)

        result = evaluate_policy(model, tokenizer, chunk, scored, self.config, seed=index)
        size = self.config.group_size  # completions come grouped by prompt, in order
        groups = [completions[i : i + size] for i in range(0, len(completions), size)]
        return {"reward": result["reward_mean"], "reward_spread": result["reward_std"],
                "distinct_share": distinct_share(groups)}


def rl_prompts(ev: dict, held_out: list[str], reward_name: str) -> list[str]:
    """The prompts an RL soak samples: the run's own, else the held-out data's first sentences, else
    the reward's own prompt set, else the paragraphs every machine has (as the trainer uses without a
    dataset)."""
    if ev.get("prompts"):
        return [str(p) for p in ev["prompts"]]
    if held_out:
        return [t.split(". ")[0][:160] for t in held_out]
    import shared.ml

    own = getattr(shared.ml, "reward_prompts", None)  # by the set's name the run recorded, else the reward's
    try:
        prompts = list(own(ev.get("prompt_set") or reward_name)) if own is not None else []
    except KeyError:  # a reward without a prompt set of its own
        prompts = []
    if prompts:
        return prompts
    import tempfile

    from shared.ml import build_demo_dataset, load_jsonl

    with tempfile.TemporaryDirectory(prefix="soak-prompts-") as tmp:
        path = Path(tmp) / "prompts.jsonl"
        build_demo_dataset(path, records=64)
        return [t.split(". ")[0][:160] for t in load_jsonl(path)]


class RetrievalEpisodes:
    """An encoder's episodes: recall@1 and MRR of mean-pooled bidirectional embeddings on held-out pairs
    (first and second half of the same text), ``retrieval_pairs`` per episode (default 8)."""

    def __init__(self, held_out: list[str], ev: dict) -> None:
        from services.validator.retrieval import retrieval_pairs

        self.pairs = retrieval_pairs(held_out)
        self.per_episode = min(int(ev.get("retrieval_pairs", 8)), len(self.pairs))
        self.max_length = int(ev.get("max_length", 128))
        self.batch_size = int(ev.get("batch_size", 4))

    def episode(self, model, tokenizer, index: int) -> dict[str, float]:
        """Nothing when the held-out data has fewer than two pairs: one pair is always found."""
        if self.per_episode < 2:
            return {}
        from services.validator.retrieval import cosine_matrix, retrieval_scores
        from shared.ml import embed_texts

        start = (index * self.per_episode) % len(self.pairs)
        chunk = (self.pairs[start:] + self.pairs[:start])[: self.per_episode]
        vectors, _ = embed_texts(model, tokenizer, [q for q, _ in chunk] + [d for _, d in chunk],
                                 max_length=self.max_length, batch_size=self.batch_size)
        return retrieval_scores(cosine_matrix(vectors[: len(chunk)], vectors[len(chunk):]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
