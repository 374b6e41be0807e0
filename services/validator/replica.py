"""One soak replica in its own process: `python -m services.validator.replica SPEC.json`.

A replica loads the base model and its adapter through the shared adapter
runtime (the loader serving uses; the artefact's sha256 and the trainer's
signature over its folder are checked: a replica whose adapter fails the check
exits 1 with the reason, naming the file, as its last line of stderr), then runs
``cycles`` x ``episodes`` evaluation episodes and prints one JSON line per
cycle: ``{"event": "cycle", "cycle": c, "replica_id": ..., "side": ...,
"samples": {metric: [...]}, "load": {...}}``.

Episode metrics: ``mntp_loss`` and ``mntp_accuracy`` (held-out masked-token
prediction) for MNTP adapters, ``reward`` (a verifiable reward on held-out
prompts) for RL adapters, and always ``latency_ms``, ``rss_mb`` and ``errors``.
Episode k of every replica uses the same held-out texts and masks, so the two
sides answer the same questions.

Spec: replica_id, side, model, adapter_sha256, adapter_uri (null: the base model
alone), kind, cycles, first_cycle (the cycles a resumed soak already has),
episodes, cooldown_s, dataset_path, eval (mask_ratio, max_length, batch_size,
eval_fraction, seed, texts_per_episode, reward, reward_params), latency_hold_ms
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
    _, held_out = split_held_out(load_jsonl(Path(spec["dataset_path"])), ev.get("eval_fraction", 0.1), ev.get("seed", 0))
    per_episode = int(ev.get("texts_per_episode", 4))
    process = psutil.Process()
    jitter_ms = float(spec.get("latency_jitter_ms") or 0.0)
    hold_ms = max(float(spec.get("latency_hold_ms") or 0.0), jitter_ms)  # no hold turns negative
    # crc32, not hash(): str hashes are salted per process, and a drill should replay
    jitter = random.Random(zlib.crc32(spec["replica_id"].encode()))
    score = None
    if spec["kind"] == "rl":
        from shared.ml import RlConfig
        from shared.ml import get_reward
        from shared.ml import evaluate_policy

        rl_config = RlConfig.from_dict({"model": spec["model"], "reward": ev.get("reward", "length_target"),
                                        "group_size": 4, "prompts_per_step": per_episode})
        score = get_reward(rl_config.reward, **(ev.get("reward_params") or {}))
        prompts = [t.split(". ")[0][:160] for t in held_out]

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
                        chunk = (prompts[start:] + prompts[:start])[:per_episode]
                        result = evaluate_policy(model, tokenizer, chunk, score, rl_config, seed=index)
                        samples.setdefault("reward", []).append(result["reward_mean"])
                    else:
                        result = evaluate_mntp(model, tokenizer, texts, ev.get("mask_ratio", 0.2), index,
                                               ev.get("max_length", 128), ev.get("batch_size", 4))
                        samples.setdefault("mntp_loss", []).append(result["loss"])
                        samples.setdefault("mntp_accuracy", []).append(result["accuracy"])
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
