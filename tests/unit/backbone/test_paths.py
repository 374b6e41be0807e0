"""Paths named by events stay under var/: ``shared.paths``, the schemas' patterns, and the services using both."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import pytest

from shared.contracts import schemas
from shared.paths import UnsafePath, contained, file_uri_path, model_spec, segment
from shared.settings import Settings

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "cycle_audit.jsonl"
SHA = "ab" * 32


# --- contained ---------------------------------------------------------------------------------


def test_a_plain_path_under_the_base_is_resolved_there(tmp_path):
    assert contained(tmp_path, "jobs", "job-1") == tmp_path.resolve() / "jobs" / "job-1"
    assert contained(tmp_path, "jobs/job-1", "checkpoint") == tmp_path.resolve() / "jobs" / "job-1" / "checkpoint"
    assert contained(tmp_path / "var", "a..b") == (tmp_path / "var").resolve() / "a..b"  # not a '..' segment
    assert contained(tmp_path) == tmp_path.resolve()


@pytest.mark.parametrize("parts", [
    ("..",), ("../etc",), ("jobs", "../../etc"), ("a/../../b",), ("jobs", ".."), ("a", "b/../../.."),
])
def test_dot_dot_is_refused(tmp_path, parts):
    with pytest.raises(UnsafePath, match=r"'\.\.'"):
        contained(tmp_path / "var", *parts)


@pytest.mark.parametrize("part", ["/etc/passwd", "/", "\\evil", str(Path("/tmp").resolve())])
def test_an_absolute_part_is_refused(tmp_path, part):
    with pytest.raises(UnsafePath, match="absolute"):
        contained(tmp_path / "var", "jobs", part)


@pytest.mark.parametrize("part", ["", ".", "a\x00b"])
def test_empty_dot_and_nul_are_refused(tmp_path, part):
    with pytest.raises(UnsafePath):
        contained(tmp_path / "var", part)


def test_a_symlink_that_leaves_the_base_is_refused(tmp_path):
    base, outside = tmp_path / "var", tmp_path / "outside"
    (base / "jobs").mkdir(parents=True)
    outside.mkdir()
    (base / "jobs" / "job-1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePath, match="outside"):
        contained(base, "jobs", "job-1")
    with pytest.raises(UnsafePath, match="outside"):
        contained(base, "jobs", "job-1", "spec.json")


def test_a_symlink_that_stays_inside_and_a_base_behind_a_symlink_are_fine(tmp_path):
    real = tmp_path / "real-var"
    (real / "datasets").mkdir(parents=True)
    (real / "latest").symlink_to(real / "datasets", target_is_directory=True)
    (tmp_path / "var").symlink_to(real, target_is_directory=True)
    assert contained(tmp_path / "var", "latest", "x.jsonl") == real.resolve() / "datasets" / "x.jsonl"


def test_unsafe_path_is_a_value_error():
    assert issubclass(UnsafePath, ValueError)


def test_segment_is_one_plain_name():
    assert segment("val-1.raw") == "val-1.raw"
    for bad in ("", ".", "..", "a/b", "../x", "/x", "a\\b", "a\x00"):
        with pytest.raises(UnsafePath):
            segment(bad)


# --- file URIs and model specs -----------------------------------------------------------------


def test_a_file_uri_under_the_base_names_its_file(tmp_path):
    datasets = tmp_path / "var" / "datasets"
    assert file_uri_path(f"file://{datasets}/{SHA}.jsonl", datasets) == datasets.resolve() / f"{SHA}.jsonl"


@pytest.mark.parametrize("uri", [
    "file:///etc/passwd", "file://{d}/../../../etc/passwd", "file://{d}/../x.jsonl", "{d}/x.jsonl",
    "file://relative/x.jsonl", "../x.jsonl", "", "s3://bucket/x.jsonl", "file://{d}", "file://{d}/x\x00",
])
def test_a_file_uri_outside_the_base_or_not_a_file_uri_is_refused(tmp_path, uri):
    datasets = tmp_path / "var" / "datasets"
    with pytest.raises(UnsafePath):
        file_uri_path(uri.format(d=datasets), datasets)


def test_a_file_uri_through_a_symlink_out_of_the_base_is_refused(tmp_path):
    datasets, outside = tmp_path / "var" / "datasets", tmp_path / "secret.jsonl"
    datasets.mkdir(parents=True)
    outside.write_text('{"text": "x"}\n')
    (datasets / "x.jsonl").symlink_to(outside)
    with pytest.raises(UnsafePath, match="outside"):
        file_uri_path(f"file://{datasets}/x.jsonl", datasets)


def test_a_model_is_named_configured_or_a_folder_under_the_models(tmp_path):
    models = tmp_path / "var" / "models"
    assert model_spec("tiny", models) == "tiny"
    assert model_spec("smollm2", models) == "smollm2"
    assert model_spec("/opt/base", models, configured="/opt/base") == "/opt/base"
    assert model_spec("mine", models) == str(models.resolve() / "mine")
    assert model_spec(str(models / "mine"), models) == str(models.resolve() / "mine")
    for bad in ("/opt/base", "../mine", f"{models}/../../etc", str(models), "/", ""):
        with pytest.raises(UnsafePath):
            model_spec(bad, models)


# --- the schemas refuse traversal ids ----------------------------------------------------------


def _golden(event_type: str) -> dict:
    for line in GOLDEN.read_text().splitlines():
        envelope = json.loads(line)
        if envelope.get("type") == event_type:
            return envelope["payload"]
    raise LookupError(event_type)


def _valid(event_type: str, version: int) -> dict:
    if (event_type, version) == ("dataset.registered", 1):
        return {"dataset_id": "ds-1", "name": "demo", "sha256": SHA, "uri": "file:///var/datasets/demo.jsonl",
                "records": 3}
    if event_type == "research.proposed":
        proposed = _golden("cycle.proposed")
        keep = json.loads((schemas.SCHEMA_DIR / "research.proposed.v1.json").read_text())["properties"]
        return {**{k: v for k, v in proposed.items() if k in keep}, "cycle_id": "res-1a2b3c", "kind": "rl",
                "warm_start": SHA}
    return copy.deepcopy(_golden(event_type))


ID_ATTACKS = ["../x", "a/../../etc", "/etc/passwd", "..", ".", "a/b", ".hidden", ""]
MODEL_ATTACKS = ["../x", "/opt/../etc", "models/../../x", "..", "a/./b", "", "/var/models/.."]
URI_ATTACKS = ["file:///var/datasets/../../etc/passwd", "/etc/passwd", "../x.jsonl", "file://relative/x.jsonl",
               "file:///var/datasets/./x", "file:///..", "http://example.org/x.jsonl"]
CONSTRAINED = [
    ("training.requested", 1, ("job_id",), ID_ATTACKS),
    ("training.requested", 1, ("model",), MODEL_ATTACKS),
    ("training.requested", 1, ("dataset", "uri"), URI_ATTACKS),
    ("training.completed", 1, ("model",), MODEL_ATTACKS),
    ("training.completed", 1, ("dataset_uri",), URI_ATTACKS),
    ("cycle.proposed", 1, ("cycle_id",), ID_ATTACKS),
    ("cycle.proposed", 1, ("model",), MODEL_ATTACKS),
    ("cycle.proposed", 1, ("dataset", "uri"), URI_ATTACKS),
    ("research.proposed", 1, ("cycle_id",), ID_ATTACKS),
    ("research.proposed", 1, ("model",), MODEL_ATTACKS),
    ("research.proposed", 1, ("dataset", "uri"), URI_ATTACKS),
    ("cycle.requested", 1, ("model",), MODEL_ATTACKS),
    ("validation.started", 1, ("validation_id",), ID_ATTACKS),
    ("dataset.registered", 1, ("uri",), URI_ATTACKS),
    ("dataset.registered", 2, ("uri",), URI_ATTACKS),
]


def _set(payload: dict, where: tuple[str, ...], value) -> dict:
    payload = copy.deepcopy(payload)
    node = payload
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    return payload


@pytest.mark.parametrize("event_type,version,where,attacks", CONSTRAINED,
                         ids=[f"{t}.v{v}:{'.'.join(w)}" for t, v, w, _ in CONSTRAINED])
def test_a_path_traversal_in_a_field_that_becomes_a_path_is_refused_by_the_schema(event_type, version, where, attacks):
    payload = _valid(event_type, version)
    if where == ("dataset", "uri") and not payload.get("dataset"):
        payload["dataset"] = {"dataset_id": "ds-1", "sha256": SHA, "uri": "file:///var/datasets/x.jsonl"}
    schemas.validate_payload(event_type, version, payload)  # the example itself is valid
    for attack in attacks:
        with pytest.raises(schemas.SchemaError):
            schemas.validate_payload(event_type, version, _set(payload, where, attack))
        with pytest.raises(schemas.SchemaError):  # as read from the log too
            schemas.validate_payload(event_type, version, _set(payload, where, attack), from_json=True)


def test_the_ids_and_paths_the_platform_writes_pass_the_schemas():
    payload = _valid("training.requested", 1)
    for job_id in ("job-cyc-9bf9f6853d44", "job-res-0123abcd4567", "j", "train.7_a"):
        schemas.validate_payload("training.requested", 1, _set(payload, ("job_id",), job_id))
    for model in ("tiny", "smollm2", "/srv/models/SmolLM2-360M", "models/mine", "/var/models/.cache/x"):
        schemas.validate_payload("training.requested", 1, _set(payload, ("model",), model))
    started = _valid("validation.started", 1)
    for validation_id in ("val-3ec299482ac26496", "drift-3ec299482ac2-20261204T130641Z"):
        schemas.validate_payload("validation.started", 1, _set(started, ("validation_id",), validation_id))


# --- the services refuse at use ----------------------------------------------------------------


def _settings(tmp_path: Path) -> Settings:
    return Settings.from_env().with_(var_dir=(tmp_path / "var").resolve(), database_url=None, trace_file=None,
                                     otlp_endpoint=None, model="tiny")


def _job(dataset_uri: str | None, model: str = "tiny") -> dict:
    from services.trainer import domain

    return {"status": domain.RUNNING, "cycle_id": "cyc-1", "kind": "mntp", "model": model,
            "dataset": {"dataset_id": "ds-1", "sha256": SHA, "uri": dataset_uri} if dataset_uri else {},
            "config": {"steps": 4}, "warm_start": None, "hardware_plan": None, "requested_by": "evolution",
            "attempt": 1, "last_step": 0, "checkpoint_step": None}


@pytest.fixture
def trainer_service(tmp_path, monkeypatch):
    from services.trainer import app as trainer_app
    from shared.service import Service

    service = Service("trainer", reads=["training", "dataset"], settings=_settings(tmp_path))

    async def flushed() -> int:  # no broker here: the outbox is what the service would publish
        return 0

    monkeypatch.setattr(service, "flush_outbox", flushed)
    monkeypatch.setattr(trainer_app, "service", service)
    return trainer_app, service


def _run_refused_job(trainer_app, service, job_id: str, job: dict) -> dict:
    from services.trainer import domain

    with service.transaction() as ctx:
        trainer_app.trainer.save(ctx, domain.TrainerState(jobs={job_id: job}))
    asyncio.run(trainer_app._run_job(job_id))
    failed = [e for e in service.own_events() if e.type == "training.failed"]
    assert len(failed) == 1, [e.type for e in service.own_events()]
    return failed[0].payload


def test_the_trainer_fails_a_job_whose_dataset_lies_outside_var(trainer_service, tmp_path):
    trainer_app, service = trainer_service
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "not for training"}\n')

    failed = _run_refused_job(trainer_app, service, "job-1", _job(f"file://{secret}"))

    assert failed["stage"] == "dataset" and "outside" in failed["error"] and str(secret) in failed["error"]
    assert not (service.settings.var_dir / "jobs" / "job-1").exists()  # nothing started, nothing written


def test_the_trainer_fails_a_job_whose_dataset_uri_climbs_out_of_var_datasets(trainer_service):
    trainer_app, service = trainer_service
    uri = f"file://{service.settings.var_dir}/datasets/../keys/trust.json"

    failed = _run_refused_job(trainer_app, service, "job-2", _job(uri))

    assert failed["stage"] == "dataset" and "'..'" in failed["error"]


def test_the_trainer_fails_a_job_whose_id_leaves_var_jobs(trainer_service, tmp_path):
    trainer_app, service = trainer_service

    failed = _run_refused_job(trainer_app, service, "../../escaped", _job(None))

    assert failed["stage"] == "request" and "'..'" in failed["error"]
    assert not (tmp_path / "escaped").exists() and not (service.settings.var_dir / "escaped").exists()


def test_the_trainer_fails_a_job_whose_model_folder_lies_outside_var_models(trainer_service, tmp_path):
    trainer_app, service = trainer_service
    (tmp_path / "elsewhere").mkdir()

    failed = _run_refused_job(trainer_app, service, "job-3", _job(None, model=str(tmp_path / "elsewhere")))

    assert failed["stage"] == "request" and "outside" in failed["error"]


def test_the_validator_refuses_to_soak_on_data_or_a_model_outside_var(tmp_path, monkeypatch):
    from services.validator import app as validator_app

    settings = _settings(tmp_path)
    monkeypatch.setattr(validator_app.service, "settings", settings)
    run = {"validation_id": "val-1", "adapter_sha256": SHA}
    inside = f"file://{settings.var_dir}/datasets/{SHA}.jsonl"

    assert validator_app._path_refusal(run, "tiny", inside) == (
        None, str(settings.var_dir / "datasets" / f"{SHA}.jsonl"), "tiny")
    assert "outside" in validator_app._path_refusal(run, "tiny", "file:///etc/passwd")[0]
    assert "outside" in validator_app._path_refusal(run, "/opt/other-model", inside)[0]
    assert "plain file name" in validator_app._path_refusal({**run, "validation_id": "../x"}, "tiny", inside)[0]


def test_a_soak_with_a_traversal_validation_id_starts_nothing(tmp_path):
    from services.validator.soak import run_soak
    from shared.artefacts import ArtefactStore

    async def on_cycle(*_):
        raise AssertionError("no cycle may run")

    run = {"validation_id": "../../escaped", "adapter_sha256": SHA, "adapter_uri": None, "baseline": {},
           "kind": "mntp", "replicas": 1, "cycles": 1, "episodes": 1}
    with pytest.raises(UnsafePath):
        asyncio.run(run_soak(run, model="tiny", dataset_path="x", store=ArtefactStore(tmp_path / "store"),
                             eval_settings={}, cooldown_s=0.0, on_cycle=on_cycle))
    assert not (tmp_path / "escaped").exists()


def test_the_artefact_store_keeps_its_keys_inside_its_folder(tmp_path):
    from shared.artefacts import LocalBackend

    backend = LocalBackend(tmp_path / "store")
    source = tmp_path / "file.txt"
    source.write_text("x")
    for key in ("../escaped", "/tmp/escaped", "blobs/../../escaped"):
        with pytest.raises(UnsafePath):
            backend.put_file(key, source)
        with pytest.raises(UnsafePath):
            backend.local_path(key)
    assert not (tmp_path / "escaped").exists()
    backend.put_file(f"blobs/{SHA}/file.txt", source)
    assert backend.exists(f"blobs/{SHA}/file.txt")
