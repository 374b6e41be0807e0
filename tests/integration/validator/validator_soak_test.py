"""Soaks of real replica processes on the tiny model, judged from their raw data.

Every soak here runs 2 candidate and 2 baseline replicas (``python -m
services.validator.replica``) that load the tiny base model and an adapter from
the artefact store, and measure held-out MNTP loss, accuracy, latency, rss and
errors per episode. Replica start-up (torch, transformers, peft) dominates the
time, so episodes are few and short and the expensive parts (the model cache,
the data set, one trained adapter, one soak of it) are built once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from services.validator.judgement import rejudge
from services.validator.soak import run_soak
from services.validator.thresholds import Thresholds
from shared.adapter_signing import sign_adapter
from shared.artefacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ArtefactStore, StoredArtefact
from shared.keys import ensure_service_keys, model_signing_key_path
from shared.settings import Settings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
EVAL = {"mask_ratio": 0.2, "max_length": 64, "batch_size": 4, "texts_per_episode": 4}
BASE = {"kind": "base", "adapter_sha256": None, "adapter_uri": None}
# 2 replicas x 5 episodes: each side reaches the default min_samples (10) in every cycle.
PLAN = {"replicas": 2, "cycles": 2, "episodes": 5}
# The masked-token objective alone decides: retrieval is measured and reported, not a veto. Trained hard on a
# randomly initialised model, the good adapter predicts masked tokens better but finds related text worse
# (see the first test), so the tests of everything else judge it on what it was trained for.
MASKED = Thresholds.from_dict({"metrics": {"retrieval_recall_at_1": {"critical": False},
                                           "retrieval_mrr": {"critical": False}}})


class Soaks:
    """One NEURONS_VAR for the module: its artefact store and the data set the replicas read."""

    def __init__(self, var: Path, dataset: Path, texts: list[str]) -> None:
        self.var = var
        self.store = ArtefactStore(var / "artefacts")
        self.dataset = dataset
        self.texts = texts

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "NEURONS_VAR": str(self.var)}

    def put(self, folder: Path) -> StoredArtefact:
        """Store an adapter signed with the trainer's key, as the trainer does (the replicas check it)."""
        key = model_signing_key_path(Settings.from_env())
        return self.store.put_adapter(folder, sign=lambda staged: sign_adapter(staged, key))

    async def run(self, candidate: StoredArtefact | None, *, baseline: dict[str, Any] = BASE,
                  cooldown_s: float = 0.0, on_cycle=None, on_replicas=None, fault: dict | None = None,
                  kind: str = "mntp", dataset: str | None = None, evaluation: dict | None = None,
                  **plan: int) -> "Soak":
        run = {
            "validation_id": f"val-{uuid.uuid4().hex[:12]}",
            "adapter_sha256": candidate.sha256 if candidate else None,
            "adapter_uri": candidate.uri if candidate else None,
            "baseline": baseline,
            "kind": kind,
            **PLAN,
            **plan,
        }
        seen: list[int] = []

        async def record(cycle: int, results: list[dict], raw_cycle: dict) -> bool:
            seen.append(cycle)
            if on_cycle is not None:
                await on_cycle(cycle, results, raw_cycle)
            return True

        started = time.monotonic()
        raw, uri, _ = await run_soak(
            run, model="tiny", dataset_path=str(self.dataset) if dataset is None else dataset, store=self.store,
            eval_settings={**EVAL, **(evaluation or {})},
            cooldown_s=cooldown_s, on_cycle=record, on_replicas=on_replicas, env=self.env, fault=fault)
        return Soak(run, raw, uri, seen, time.monotonic() - started)


class Soak:
    def __init__(self, run: dict, raw: dict, uri: str, cycles_reported: list[int], seconds: float) -> None:
        self.run, self.raw, self.uri, self.cycles_reported, self.seconds = run, raw, uri, cycles_reported, seconds

    def replica(self, cycle: int, replica_id: str) -> dict[str, Any]:
        record = next(c for c in self.raw["cycles"] if c["cycle"] == cycle)
        return next(r for r in record["replicas"] if r["replica_id"] == replica_id)

    def series(self, replica_id: str, metric: str) -> list[float]:
        """One replica's values, episode after episode, over all cycles."""
        return [v for c in self.raw["cycles"] for r in c["replicas"] if r["replica_id"] == replica_id
                for v in r["samples"].get(metric, [])]

    def pooled(self, side: str, metric: str) -> list[float]:
        return [v for c in self.raw["cycles"] for r in c["replicas"] if r["side"] == side
                for v in r["samples"].get(metric, [])]


@pytest.fixture(scope="module")
def soaks(tmp_path_factory) -> Soaks:
    from shared.ml.datasets import build_demo_dataset, load_jsonl
    from shared.ml.models import load_model

    var = tmp_path_factory.mktemp("validator-var")
    # The tiny model is built once into the cache the trainer's tests share and
    # linked into this NEURONS_VAR, so the replicas load it without rebuilding.
    shared_cache = Path(os.environ.get("NEURONS_TEST_MODEL_CACHE", REPO / "var" / "models"))
    load_model("tiny", shared_cache)
    (var / "models").mkdir()
    (var / "models" / "tiny").symlink_to((shared_cache / "tiny").resolve(), target_is_directory=True)
    dataset = var / "demo.jsonl"
    build_demo_dataset(dataset, records=120)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEURONS_VAR", str(var))
        mp.delenv("NEURONS_ARTEFACT_REMOTE", raising=False)
        for name in ("NEURONS_TRUST", "NEURONS_SERVICE_KEYS"):
            mp.delenv(name, raising=False)
        ensure_service_keys(Settings.from_env())  # the adapter-signing key, anchored under var/keys
        yield Soaks(var, dataset, load_jsonl(dataset))


@pytest.fixture(scope="module")
def good_adapter(soaks) -> StoredArtefact:
    from shared.ml.mntp import train_mntp

    # On a randomly initialised model attention LoRA can only lower the masked
    # loss by ~1.5 %: enough for the 1 % minimum effect, and deterministic.
    result = train_mntp({"model": "tiny", "steps": 30, "learning_rate": 1e-2, "batch_size": 8, "max_length": 64},
                        soaks.texts, soaks.var / "train", soaks.var / "models")
    assert result.status == "trained"
    assert result.metrics["after"]["loss"] < result.metrics["before"]["loss"]
    return soaks.put(result.adapter_dir)


@pytest.fixture(scope="module")
def noisy_adapter(soaks, good_adapter) -> StoredArtefact:
    """The good adapter with gaussian noise on every LoRA matrix, tens of times the trained weights' spread."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(good_adapter.path / ADAPTER_WEIGHTS))
    generator = torch.Generator().manual_seed(3)
    noisy = {}
    for name, tensor in tensors.items():
        if "lora_A" in name or "lora_B" in name:
            tensor = tensor + torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 2.0
        noisy[name] = tensor.contiguous()
    assert any("lora_B" in n for n in noisy) and any("lora_A" in n for n in noisy)
    folder = soaks.var / "noisy-adapter"
    folder.mkdir()
    save_file(noisy, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copyfile(good_adapter.path / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
    stored = soaks.put(folder)
    assert stored.sha256 != good_adapter.sha256
    return stored


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def good_soak(soaks, good_adapter) -> Soak:
    return await soaks.run(good_adapter)


def _sizes(verdict) -> dict[str, dict[str, int]]:
    return verdict.to_payload()["sample_sizes"]


async def test_an_adapter_better_than_the_base_model_passes(good_soak, good_adapter):
    soak = good_soak
    assert soak.cycles_reported == [1, 2]
    assert soak.raw["adapter_sha256"] == good_adapter.sha256 and soak.raw["baseline"] == BASE
    assert all(r["incident"] is None for c in soak.raw["cycles"] for r in c["replicas"])
    # The replicas answered the same masked questions: replicas of one side agree exactly,
    # and episode by episode the adapter's loss is the lower one.
    assert soak.series("candidate-0", "mntp_loss") == soak.series("candidate-1", "mntp_loss")
    pairs = list(zip(soak.series("candidate-0", "mntp_loss"), soak.series("baseline-0", "mntp_loss")))
    assert len(pairs) == 10 and all(adapted < base for adapted, base in pairs)

    verdict = rejudge(soak.raw, MASKED)
    payload = verdict.to_payload()
    assert verdict.outcome == "pass", verdict.reason
    assert payload["verdict"] == "pass" and payload["vetoes"] == []
    loss = verdict.metrics["mntp_loss"]
    assert loss.outcome == "better", loss.reason
    assert loss.comparison.candidate_median < loss.comparison.baseline_median
    assert loss.effect >= Thresholds.default().metrics["mntp_loss"].min_effect
    assert verdict.metrics["mntp_accuracy"].outcome == "better"
    assert verdict.metrics["errors"].outcome == "same"
    assert [c["outcome"] for c in payload["cycles"]] == ["pass", "pass"]
    assert _sizes(verdict)["candidate"] == _sizes(verdict)["baseline"] == {
        m: 20 for m in ("mntp_loss", "mntp_accuracy", "retrieval_recall_at_1", "retrieval_mrr", "latency_ms", "rss_mb",
                        "errors")}
    # measured as an encoder too: retrieval on held-out halves, both sides answering the same pairs
    retrieval = payload["retrieval"]
    assert retrieval["candidate"]["episodes"] == retrieval["baseline"]["episodes"] == 20
    assert soak.series("candidate-0", "retrieval_mrr") == soak.series("candidate-1", "retrieval_mrr")
    assert 0.0 < retrieval["baseline"]["mrr"] <= 1.0 and 0.0 <= retrieval["candidate"]["recall_at_1"] <= 1.0


async def test_an_adapter_that_finds_related_text_worse_fails_however_well_it_predicts_masked_tokens(good_soak):
    verdict = rejudge(good_soak.raw, Thresholds.default())
    retrieval = verdict.to_payload()["retrieval"]
    assert retrieval["candidate"]["mrr"] < retrieval["baseline"]["mrr"] - 0.1, retrieval
    assert verdict.metrics["mntp_loss"].outcome == "better"
    assert verdict.outcome == "fail" and "retrieval_mrr" in verdict.vetoes, verdict.reason
    assert "candidate n=20 per metric from 2 replicas" in verdict.reason


async def test_an_adapter_with_noisy_weights_fails_against_the_one_in_production(
        soaks, good_adapter, noisy_adapter):
    # On the tiny model, whose random output head keeps every loss near ln(vocabulary),
    # noise cannot push the loss far above the base model's: what it destroys is the
    # trained adapter's gain. So the corrupted candidate soaks against the intact
    # adapter serving in production.
    production = {"kind": "production", "adapter_sha256": good_adapter.sha256, "adapter_uri": good_adapter.uri}
    soak = await soaks.run(noisy_adapter, baseline=production)
    verdict = rejudge(soak.raw, Thresholds.default())

    assert verdict.outcome == "fail", verdict.reason
    assert "mntp_loss" in verdict.vetoes
    loss = verdict.metrics["mntp_loss"]
    assert loss.outcome == "worse" and loss.critical
    assert loss.comparison.candidate_median > loss.comparison.baseline_median * 1.01
    # Episode by episode (the same texts and masks on both sides) the noisy adapter does worse.
    pairs = list(zip(soak.series("candidate-0", "mntp_loss"), soak.series("baseline-0", "mntp_loss")))
    assert len(pairs) == 10 and all(noisy > intact for noisy, intact in pairs)
    assert "critical metric worse: mntp_loss worse" in verdict.reason
    assert all(c.outcome == "fail" and "mntp_loss" in c.vetoes for c in verdict.cycles)
    # Broken weights are still weights: the episodes ran, nothing errored.
    assert set(soak.pooled("candidate", "errors")) == {0.0}


async def test_a_wider_latency_spread_alone_is_caught_by_the_shape_test(soaks):
    # The base model on both sides: identical losses; only the candidate's latency
    # spreads, around the same median (a jitter drill holds both sides alike).
    soak = await soaks.run(None, fault={"latency_jitter_ms": 400.0}, episodes=10)
    verdict = rejudge(soak.raw, Thresholds.default())

    assert soak.pooled("candidate", "mntp_loss") == soak.pooled("baseline", "mntp_loss")
    # Both sides were held 400 ms per episode; only the candidate's hold moved early and late.
    assert min(soak.pooled("baseline", "latency_ms")) >= 400.0
    assert min(soak.pooled("candidate", "latency_ms")) < min(soak.pooled("baseline", "latency_ms"))
    assert verdict.metrics["mntp_loss"].outcome == "same"
    latency = verdict.metrics["latency_ms"]
    c = latency.comparison
    assert (c.n_candidate, c.n_baseline) == (40, 40)
    assert latency.outcome == "worse", latency.reason
    # The Kolmogorov-Smirnov test caught it, not Mann-Whitney: the location did not move.
    spec = Thresholds.default().metrics["latency_ms"]
    assert c.p_ks < spec.alpha
    assert c.p_worse >= spec.alpha and c.p_better >= spec.alpha
    assert c.relative_tail_shift >= spec.min_effect  # the p95 moved out
    assert latency.reason.startswith("latency_ms worse in the tail")
    assert verdict.outcome != "pass", verdict.reason
    assert "latency_ms" in verdict.reason


async def test_stored_raw_data_rejudges_to_the_same_verdict(soaks, good_soak):
    stored = json.loads(soaks.store.get(good_soak.uri).read_text())
    assert stored == good_soak.raw

    same = rejudge(stored, MASKED)
    assert same.to_payload() == rejudge(good_soak.raw, MASKED).to_payload()
    assert same.outcome == "pass"

    # A 50 % minimum effect makes the loss's gain immaterial, and with the loss "same"
    # no score can reach 0.75.
    stricter = Thresholds.from_dict({"metrics": {"mntp_loss": {"min_effect": 0.5}}, "pass_score": 0.75}, base=MASKED)
    strict = rejudge(stored, stricter)
    assert strict.outcome != "pass", strict.reason
    loss = strict.metrics["mntp_loss"]
    assert loss.outcome == "same" and "significant but below the minimum effect" in loss.reason
    assert strict.score < same.score
    # The verdict carries its thresholds: restoring them re-judges to the same verdict.
    restored = Thresholds.restore(strict.to_payload()["thresholds"])
    assert rejudge(stored, restored).to_payload() == strict.to_payload()


async def test_a_replica_killed_mid_run_is_an_incident_with_a_reduced_sample(soaks, good_adapter):
    pids: dict[str, int] = {}
    killed: list[int] = []

    async def kill_after_first_cycle(cycle: int, results: list[dict], raw_cycle: dict) -> None:
        if cycle == 1:
            os.kill(pids["candidate-0"], signal.SIGKILL)
            killed.append(pids["candidate-0"])

    # The cooldown keeps every replica between its cycles while the first cycle is reported.
    soak = await soaks.run(good_adapter, cooldown_s=4.0, on_cycle=kill_after_first_cycle,
                           on_replicas=pids.update)
    assert sorted(pids) == ["baseline-0", "baseline-1", "candidate-0", "candidate-1"] and killed

    assert soak.replica(1, "candidate-0")["incident"] is None
    dead = soak.replica(2, "candidate-0")
    assert dead["samples"] == {}
    assert dead["incident"]["reason"].startswith("replica exited with -9")
    survivor = soak.replica(2, "candidate-1")
    assert survivor["incident"] is None and len(survivor["samples"]["mntp_loss"]) == 5
    assert all(len(soak.replica(2, b)["samples"]["mntp_loss"]) == 5 for b in ("baseline-0", "baseline-1"))

    verdict = rejudge(soak.raw, MASKED)
    payload = verdict.to_payload()
    assert payload["incidents"] == [{"cycle": 2, "replica_id": "candidate-0", "side": "candidate",
                                     "reason": dead["incident"]["reason"]}]
    assert payload["replicas"]["candidate"] == {"replicas": 2, "with_incident": 1}
    assert set(payload["sample_sizes"]["candidate"].values()) == {15}
    assert set(payload["sample_sizes"]["baseline"].values()) == {20}
    assert "Unequal sample sizes: mntp_loss candidate 15 vs baseline 20" in verdict.reason
    assert "1 incident: cycle 2, candidate replica candidate-0: replica exited with -9" in verdict.reason
    # Cycle 2 alone has 5 candidate samples, under the minimum of 10; the pooled run is still judged.
    assert payload["cycles"][1]["outcome"] == "inconclusive"
    assert verdict.metrics["mntp_loss"].outcome == "better"
    assert verdict.outcome == "pass", verdict.reason


async def test_a_replica_refuses_an_adapter_whose_files_changed_after_signing(soaks, good_adapter):
    from safetensors.torch import load_file, save_file

    # Other weights than the good adapter's (so another sha256), stored signed, then one file edited in the store:
    # its sha256 name still holds, only the signature tells.
    tensors = {name: (t * 1.001).contiguous() for name, t in load_file(str(good_adapter.path / ADAPTER_WEIGHTS)).items()}
    folder = soaks.var / "edited-adapter"
    folder.mkdir()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copyfile(good_adapter.path / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
    stored = soaks.put(folder)
    config = json.loads((stored.path / ADAPTER_CONFIG).read_text())
    (stored.path / ADAPTER_CONFIG).write_text(json.dumps({**config, "lora_alpha": 4 * config["lora_alpha"]}))
    assert soaks.store.verify(stored.sha256)

    soak = await soaks.run(stored, replicas=1, cycles=1, episodes=1)
    refused = soak.replica(1, "candidate-0")
    assert refused["samples"] == {}
    assert refused["incident"]["reason"].startswith("replica exited with 1: adapter signature check failed")
    assert f"{ADAPTER_CONFIG} was modified" in refused["incident"]["reason"]
    assert soak.replica(1, "baseline-0")["incident"] is None


async def test_an_rl_soak_without_data_samples_the_rewards_prompts_at_the_runs_settings(soaks):
    # the base model on both sides: only what an RL replica measures is under test here
    soak = await soaks.run(None, kind="rl", dataset="", replicas=1, cycles=1, episodes=3,
                           evaluation={"reward": "digits_only", "temperature": 0.7, "max_new_tokens": 4})
    for replica in ("candidate-0", "baseline-0"):
        samples = soak.replica(1, replica)["samples"]
        assert soak.replica(1, replica)["incident"] is None
        assert len(samples["reward"]) == len(samples["reward_spread"]) == len(samples["distinct_share"]) == 3
        assert all(0.0 <= v <= 1.0 for v in samples["reward"] + samples["distinct_share"])
    # the same sampling seeds on both sides: the same model gives the same answers
    assert soak.series("candidate-0", "reward") == soak.series("baseline-0", "reward")
    payload = rejudge(soak.raw, Thresholds.from_dict({"min_samples": 3})).to_payload()
    assert payload["policy"]["candidate"]["episodes"] == 3
    # a randomly initialised model answers anything but one thing: no collapse
    assert payload["policy"]["collapsed"] is False
