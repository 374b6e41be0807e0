"""`neurons bench --quick`: every figure runs end to end at smoke sizes and is reported with a number."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[3]
FIGURES = ["bus", "signing.sign", "signing.verify", "signing.verify_cold", "replay.archive", "replay.log",
           "promotion", "serving.generate", "serving.embeddings", "serving.swap", "trainer", "energy",
           "learning.mntp_loss", "learning.mntp_retrieval", "learning.rl_reward", "learning.validator_corrupted"]


@pytest.fixture(scope="module")
def model_cache() -> Path:
    # Shared with the trainer's tests: the tiny model is built once per checkout.
    path = Path(os.environ.get("NEURONS_TEST_MODEL_CACHE", REPO / "var" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.timeout(420)
def test_quick_bench_reports_every_figure_with_a_number(tmp_path, model_cache):
    from bench import runner

    before = {k: os.environ.get(k) for k in ("NEURONS_VAR", "NEURONS_TOPIC_PREFIX", "KAFKA_BOOTSTRAP_SERVERS")}
    out = tmp_path / "bench" / "latest.json"
    runner.run(quick=True, out=out, model_cache=model_cache)

    report = json.loads(out.read_text())
    assert set(report) >= {"machine", "started_at", "duration_s", "figures"}
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu_model"]
    assert "gpu" in report["machine"] and report["duration_s"] > 0
    assert [f["name"] for f in report["figures"]] == FIGURES
    for figure in report["figures"]:
        assert isinstance(figure["value"], (int, float)), f"{figure['name']}: {figure['notes']}"
        assert set(figure) >= {"name", "value", "unit", "baseline", "target", "passed", "samples", "notes"}
        assert isinstance(figure["passed"], bool) and figure["samples"] > 0 and figure["target"]
        if figure["name"] in ("promotion", "serving.swap"):
            assert 0 < figure["p50"] <= figure["p99"] == figure["value"]
        elif figure["name"] == "learning.validator_corrupted":  # a share of verdicts: nothing to compare with
            assert 0 <= figure["value"] <= 1 and figure["baseline"] is None
            assert len(figure["corrupted_verdicts"]) == 2 and len(figure["clean_verdicts"]) == 1
        elif figure["name"] == "learning.mntp_retrieval":  # a random model's recall@1 may be 0
            assert 0 <= figure["baseline"] <= 1 and 0 <= figure["value"] <= 1
        else:
            assert figure["baseline"] > 0 and figure["ratio"] == pytest.approx(figure["value"] / figure["baseline"])
    # The scratch platform leaves the caller's environment as it found it.
    assert {k: os.environ.get(k) for k in before} == before


def _cli() -> typer.Typer:
    from cli.bench_cmd import bench

    app = typer.Typer()
    app.command()(bench)
    return app


def test_gpu_flag_without_a_gpu_says_so_and_exits_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = CliRunner().invoke(_cli(), ["--gpu"])
    assert result.exit_code == 2
    assert "no CUDA GPU" in result.output and len(result.output.strip().splitlines()) == 1


def test_the_help_lists_every_figure_the_runner_knows():
    from bench import runner
    from cli.bench_cmd import FIGURE_HELP

    assert FIGURE_HELP.split(", ") == list(runner.FIGURES)


def test_an_unknown_figure_is_refused():
    result = CliRunner().invoke(_cli(), ["--only", "bus,warp"])
    assert result.exit_code == 2
    assert "warp" in result.output
