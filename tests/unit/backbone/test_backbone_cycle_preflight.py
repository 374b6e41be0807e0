"""What `neurons cycle run` checks before it asks for a cycle: the dataset evolution would train on, the model."""

import pytest

from cli.cycle_run import dataset_problem, model_problem


@pytest.fixture
def settings(tmp_path, monkeypatch):
    from shared.settings import Settings

    monkeypatch.setenv("NEURONS_VAR", str(tmp_path / "var"))
    monkeypatch.delenv("NEURONS_MODEL", raising=False)
    return Settings.from_env()


def registered(settings, dataset_id: str, *, quarantined: bool = False, on_disk: bool = True) -> dict:
    path = settings.var_dir / "datasets" / f"{dataset_id}.jsonl"
    if on_disk:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"text": "a"}\n')
    return {"dataset_id": dataset_id, "uri": path.as_uri(), "quarantined": quarantined}


def test_the_latest_usable_dataset_will_do(settings):
    assert dataset_problem(settings, [registered(settings, "ds-1"), registered(settings, "ds-2")], None) is None


def test_no_dataset_says_how_to_register_one(settings):
    assert dataset_problem(settings, [], None) == (
        "no usable dataset is registered; `neurons data add FILE.jsonl --operator NAME` registers one")


def test_the_latest_dataset_quarantined_after_the_fact_leaves_none_as_evolution_sees_it(settings):
    ds = registered(settings, "ds-1")

    assert dataset_problem(settings, [ds, {**ds, "quarantined": True}], None).startswith("no usable dataset")


def test_a_named_dataset_must_be_registered_and_not_quarantined(settings):
    log = [registered(settings, "ds-1"), registered(settings, "ds-q", quarantined=True)]

    assert dataset_problem(settings, log, "ds-1") is None
    assert dataset_problem(settings, log, "ds-q").startswith("dataset 'ds-q' is quarantined")
    assert dataset_problem(settings, log, "ds-x").startswith("dataset 'ds-x' is not registered")


def test_a_dataset_whose_file_is_gone_is_named(settings):
    problem = dataset_problem(settings, [registered(settings, "ds-1", on_disk=False)], None)

    assert problem.startswith("dataset ds-1: its file ") and problem.endswith("ds-1.jsonl is missing")


def test_models_that_load_and_those_that_do_not(settings):
    assert model_problem(settings, "tiny") is None
    assert "not tiny, smollm2 or a folder with config.json" in model_problem(settings, "missing-model")
    assert "lies outside" in model_problem(settings, "/etc")
    folder = settings.model_cache_dir / "mine"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert model_problem(settings, "mine") is None
