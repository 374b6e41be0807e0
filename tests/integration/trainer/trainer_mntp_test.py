"""MNTP training on the tiny model: artefacts, exact reload, resume, warm start."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from shared.ml.mntp import MntpConfig, evaluate_mntp, train_mntp
from shared.ml.models import load_model
from tests.integration.trainer.resume_support import crash_then_resume, same_adapter


def _config(**changes) -> MntpConfig:
    # On the CPU in float32 wherever the tests run: they compare logits and adapters bit for bit.
    base = dict(model="tiny", steps=6, batch_size=4, max_length=48, learning_rate=5e-3,
                progress_every=2, checkpoint_every=0, warmup_steps=1, seed=7, device="cpu", precision="float32")
    return MntpConfig(**{**base, **changes})


def test_trained_adapter_reloads_to_the_same_logits(model_cache, texts, tmp_path):
    points = []
    result = train_mntp(_config(), texts, tmp_path / "run", model_cache, progress=points.append, dataset_sha256="ab" * 32)

    assert result.status == "trained" and result.kind == "mntp"
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "training_summary.json"]
    assert [p["step"] for p in points] == [2, 4, 6]
    assert set(points[0]) >= {"step", "total_steps", "loss", "learning_rate", "tokens_per_s", "tokens"}
    assert points[-1]["tokens"] == result.tokens > 0
    summary = json.loads(result.summary_path.read_text())
    assert summary["dataset_sha256"] == "ab" * 32
    assert summary["base_model"]["checksum"] == load_model("tiny", model_cache).info["checksum"]
    assert summary["metrics"]["after"]["tokens"] == summary["metrics"]["before"]["tokens"] > 0
    assert [p["step"] for p in summary["loss_curve"]] == [2, 4, 6]
    assert summary["software"]["torch"] and summary["energy"] is None
    assert summary["placement"] == {"device": "cpu", "device_name": "cpu", "precision": "float32"}

    trained = result.model.eval()
    reloaded = PeftModel.from_pretrained(load_model("tiny", model_cache).model, str(result.adapter_dir)).eval()
    ids = torch.tensor([[101, 202, 303, 404, 505, 606, 707]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
    assert torch.equal(expected, actual)
    # The adapter moved the model: the base alone gives other logits.
    with torch.no_grad(), reloaded.disable_adapter():
        assert not torch.equal(reloaded(input_ids=ids).logits, actual)


def test_held_out_loss_falls_on_tiny(model_cache, texts, tmp_path):
    result = train_mntp(_config(steps=12, learning_rate=1e-2), texts, tmp_path / "run", model_cache)
    assert result.metrics["after"]["loss"] < result.metrics["before"]["loss"]


def test_evaluation_is_deterministic(model_cache, texts):
    loaded = load_model("tiny", model_cache)
    first = evaluate_mntp(loaded.model, loaded.tokenizer, texts[:6], 0.2, seed=1, max_length=32, batch_size=4)
    second = evaluate_mntp(loaded.model, loaded.tokenizer, texts[:6], 0.2, seed=1, max_length=32, batch_size=4)
    other_masks = evaluate_mntp(loaded.model, loaded.tokenizer, texts[:6], 0.2, seed=2, max_length=32, batch_size=4)
    assert first == second
    assert first != other_masks


def test_resume_continues_from_the_checkpoint_step(model_cache, texts, tmp_path):
    config = _config(steps=6, checkpoint_every=3, progress_every=1)
    resumed, resumed_points = crash_then_resume(train_mntp, config, texts, tmp_path / "crashed", model_cache, crash_at=4)
    assert resumed.resumed_from_step == 3
    assert [p["step"] for p in resumed_points] == [4, 5, 6]
    assert [p["checkpoint_step"] for p in resumed_points] == [3, 3, 3]

    straight = train_mntp(config, texts, tmp_path / "straight", model_cache)
    # Batches, masks, dropout and optimiser state are all restored: the same adapter.
    assert same_adapter(resumed.adapter_dir, straight.adapter_dir)
    assert resumed.metrics == straight.metrics


def test_warm_start_begins_where_the_previous_adapter_ended(model_cache, texts, tmp_path):
    first = train_mntp(_config(steps=4), texts, tmp_path / "first", model_cache)
    second = train_mntp(_config(steps=2), texts, tmp_path / "second", model_cache, warm_start_adapter=first.adapter_dir)
    assert second.metrics["before"] == first.metrics["after"]
    assert second.summary["warm_start"] == str(first.adapter_dir)


@pytest.mark.slow
def test_smollm2_held_out_loss_falls(model_cache, texts, tmp_path):
    config = MntpConfig(model="smollm2", steps=6, batch_size=4, max_length=32, learning_rate=2e-3,
                        warmup_steps=1, progress_every=2, checkpoint_every=0, eval_fraction=0.1, seed=0)
    points = []
    result = train_mntp(config, texts, tmp_path / "smol", model_cache, progress=points.append)
    before, after = result.metrics["before"]["loss"], result.metrics["after"]["loss"]
    print(f"smollm2 held-out MNTP loss {before:.3f} -> {after:.3f}, {result.tokens_per_s:.0f} tokens/s")
    assert after < before - 0.2
    assert result.base_model["name"] == "smollm2"


def test_a_bfloat16_base_trains_a_float32_adapter(model_cache, texts, tmp_path):
    from safetensors.torch import load_file

    result = train_mntp(_config(steps=12, learning_rate=1e-2, device="cpu", precision="bfloat16"), texts,
                        tmp_path / "run", model_cache)

    summary = json.loads(result.summary_path.read_text())
    assert summary["placement"] == {"device": "cpu", "device_name": "cpu", "precision": "bfloat16"}
    assert summary["config"]["precision"] == "bfloat16"
    weights = dict(result.model.named_parameters())
    assert {p.dtype for name, p in weights.items() if "lora_" in name} == {torch.float32}
    assert {p.dtype for name, p in weights.items() if "lora_" not in name} == {torch.bfloat16}
    # the rotary frequencies stay float32, as transformers keeps them in a model loaded in bfloat16
    assert {b.dtype for name, b in result.model.named_buffers() if "inv_freq" in name} == {torch.float32}
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    trained = {name.replace(".default", ""): p for name, p in weights.items() if "lora_" in name}
    assert all(torch.equal(trained[name], tensor) for name, tensor in saved.items())
    assert result.metrics["after"]["loss"] < result.metrics["before"]["loss"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this node has a CUDA GPU")
def test_a_gpu_asked_for_on_a_node_without_one_fails_with_what_to_do(model_cache, texts, tmp_path):
    from shared.ml.placement import PlacementError, resolve

    assert resolve().describe() == {"device": "cpu", "device_name": "cpu", "precision": "float32"}
    with pytest.raises(PlacementError, match="sees no CUDA GPU on this node; use device=auto or device=cpu"):
        train_mntp(_config(device="cuda"), texts, tmp_path / "run", model_cache)
    assert not (tmp_path / "run" / "adapter").exists()


def test_predicted_positions_pick_what_the_boolean_selection_picks():
    from shared.ml.mntp import IGNORE, predicted_positions

    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 50, (3, 9), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.6] = IGNORE
    hidden = torch.randn(3, 9, 5, generator=generator)

    positions, targets = predicted_positions(labels)
    selected = labels[:, 1:] != IGNORE
    assert torch.equal(hidden.flatten(0, 1).index_select(0, positions), hidden[:, :-1][selected])
    assert torch.equal(targets, labels[:, 1:][selected]) and len(targets) == int(selected.sum()) > 0
