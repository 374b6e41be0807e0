"""What the end-to-end tests share: the tiny-model platform and one cycle run through the CLI."""

import json

from tests.support import Platform

SERVICES = ("trainer", "evolution", "approval", "validator", "energy", "registry")
# A tiny model learns measurably in 30 steps at this rate; the soak stays short.
TINY = {"NEURONS_MODEL": "tiny", "NEURONS_MODEL_PARAMS": "3000000", "NEURONS_SCHEDULE_INTERVAL_S": "0",
        "NEURONS_DRIFT_SOAK_S": "0", "NEURONS_EVOLUTION_TICK_S": "1", "NEURONS_MIN_STEPS": "1",
        "NEURONS_MAX_LOAD_PER_CORE": "1000",
        "NEURONS_SOAK_REPLICAS": "2", "NEURONS_SOAK_CYCLES": "2", "NEURONS_SOAK_EPISODES": "5",
        "NEURONS_CHECKPOINT_EVERY": "10"}
CYCLE = ("cycle", "run", "--model", "tiny", "--steps", "30", "--set", "learning_rate=0.001", "--operator", "ops",
         "--requested-by", "alice", "--json")


def prepare(platform: Platform, tmp_path) -> None:
    platform.env.update(TINY)
    platform.env["NEURONS_TRACE_FILE"] = str(platform.var_dir / "traces.jsonl")
    platform.enroll("ops", "approver")  # signs the promotion
    platform.enroll("alice", "requester")  # asks for the cycle, registers the dataset and the profile
    from shared.ml.datasets import build_demo_dataset

    build_demo_dataset(tmp_path / "demo.jsonl", records=120)


def start(platform: Platform, tmp_path) -> None:
    platform.start(*SERVICES)
    platform.cli("profiles", "create", "helper-en", "--channel", "production", "--trait", "tone=warm",
                 "--operator", "alice")
    platform.cli("data", "add", str(tmp_path / "demo.jsonl"), "--name", "stdlib", "--no-cycle", "--operator", "alice")


def spans(platform: Platform) -> list[dict]:
    path = platform.var_dir / "traces.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
