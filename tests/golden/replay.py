"""Replay a recorded cycle through each service's pure domain: what it decides, what the read models hold.

``cycle_audit.jsonl`` is the audit export (``neurons audit export``) of one
tiny-model cycle run end to end through the CLI, as tests/e2e runs it: an
operator's key, a profile, a dataset, ``cycle run`` from request to promotion.
``replay`` reads it back with no broker, no process and no network and, in
archive order, hands every event to each of the six services the way its
app.py does: only the types app.py subscribes to, the same configuration,
the event's ``occurred_at`` where app.py reads the clock. What comes out is
kept per service, in order, as plain dicts; the registry's read models are
rebuilt from the export with the project's own rebuild machinery and kept as
the digests ``neurons audit verify`` compares.

Not replayed, because it needs the world: the trainer's job run (a worker
process training a model; its progress and result are the trainer's commands),
the validator's soak (replica processes; its cycles and result are the
validator's commands), and every timer (approval expiry, evolution's tick,
energy's hardware profile, the validator's drift soak), which reads the clock
or the machine rather than an event.

Archive order is the order the registry archived events in. Across topics it
is not the order of cause and effect: the registry archives its own decisions
when they come back from the log, after what others did in answer to them. A
service is handed its own events too, as app.py is; so here evolution folds the
recorded ``cycle.completed`` before the ``adapter.promoted`` that caused it, and
decides nothing more on the promotion.

The recording predates signed subjects: its operator decisions sign no
``subject``, and today's rules refuse them as malformed. So that the replay
still checks what the services decide, ``resign`` re-signs each recorded
decision when the export is loaded, with the same fields plus the subject
``decision_subject`` computes from the request it answers, by a key derived
from a fixed seed (``operator_key``) that the replay's keyring
(``recording_keyring``) holds in place of the recording operator's. The
export itself is left as it was recorded, and the read models are rebuilt from
it as recorded (projecting checks no signature).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import Session, create_engine

from services.approval import domain as approval
from shared.policy_file import load_policies
from services.energy import domain as energy
from services.evolution import domain as evolution
from services.evolution.search import DEFAULT_CONFIG, DEFAULT_SPACE, Param, SearchSettings, SearchSpace
from services.registry import domain as registry
from services.registry.audit import VOLATILE_COLUMNS
from services.registry.projections import all_projections
from services.trainer import domain as trainer
from services.validator import domain as validator
from services.validator.thresholds import Thresholds
from shared.archive import rebuild, table_digest
from shared.bus import decode
from shared.contracts.envelope import Envelope, NewEvent
from shared.contracts.trust import Keyring, decision_subject, public_key_b64, sign_decision

HERE = Path(__file__).resolve().parent
# The recording's operators and their roles; their keys are the replay's own (``operator_key``).
OPERATORS = {"ops": ("approver",)}
OPERATORS_SINCE = "2026-12-04T13:06:16.137195Z"  # when the recording enrolled them
SEED = b"neurons golden replay"

# What the recording's environment set (TINY in tests/e2e/cycle_support.py), where an app.py reads it.
MODEL = "tiny"
MODEL_PARAMS = 3_000_000
MIN_STEPS, MAX_STEPS = 1, 2000
MAX_LOAD_PER_CORE = 1000.0
CARBON_CAUTION_G_PER_KWH = 450.0
CARBON_INTENSITY_G_PER_KWH = 400.0  # the default
SOAK_PLAN = validator.SoakPlan(replicas=2, cycles=2, episodes=5)
NODE = "vm"  # the host the recording ran on: producer.node of every event

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class Committed:
    """An emitted event as a service folds it into its state once committed (app.py's ``_stage``),
    stamped with the time of the event that caused it."""

    type: str
    aggregate_id: str
    payload: dict
    occurred_at: datetime

    @property
    def aggregate_type(self) -> str:
        return self.type.split(".", 1)[0]


def _fold(evolve: Callable, state: Any, events: Iterable[NewEvent], at: datetime) -> Any:
    for new in events:
        state = evolve(state, Committed(new.type, new.aggregate_id, dict(new.payload), at))
    return state


class ApprovalReplay:
    """services/approval/app.py: proposals and passing validations open requests; signed decisions close them."""

    def __init__(self, keyring: Keyring) -> None:
        self.config = approval.ApprovalConfig(keyring=keyring, policies=load_policies(None),
                                              request_ttl=timedelta(hours=24))
        self.state = approval.initial_state()

    def handle(self, event: Envelope) -> list[NewEvent]:
        if event.type in ("cycle.proposed", "research.proposed", "validation.completed"):
            message = event
        elif event.type == "approval.decision_submitted":
            message = approval.SubmitDecision(signed=event.payload["signed"], received_at=event.occurred_at,
                                              request_id=event.payload["request_id"])
        else:
            return []
        self.state, events = approval.handle(message, self.state, self.config)
        return events


class EnergyReplay:
    """services/energy/app.py: every finished job's energy; the state folds what it reports."""

    def __init__(self) -> None:
        self.config = energy.EnergyConfig(carbon_intensity_g_per_kwh=CARBON_INTENSITY_G_PER_KWH, pue=1.2,
                                          scaling=energy.ScalingConfig(default_model_params=MODEL_PARAMS))
        self.state = energy.initial_state(self.config)

    def handle(self, event: Envelope) -> list[NewEvent]:
        if event.type not in ("training.completed", "validation.completed"):
            return []
        events = energy.decide(event, self.state, self.config)
        self.state = _fold(energy.evolve, self.state, events, event.occurred_at)
        return events


def _search_settings() -> SearchSettings:
    params = tuple(Param("steps", "int", MIN_STEPS, MAX_STEPS) if p.name == "steps" else p
                   for p in DEFAULT_SPACE.params)
    initial = {**DEFAULT_CONFIG, "steps": min(max(DEFAULT_CONFIG["steps"], MIN_STEPS), MAX_STEPS)}
    return SearchSettings(space=SearchSpace(params), initial_config=initial, seed=0)


class EvolutionReplay:
    """services/evolution/app.py: every event it reads; operators' requests become commands."""

    READS = frozenset({"dataset", "cycle", "research", "approval", "training", "validation", "energy",
                       "hardware", "scaling", "adapter"})

    def __init__(self, keyring: Keyring) -> None:
        self.config = evolution.EvolutionConfig(
            model=MODEL, search=_search_settings(), keyring=keyring, policies=load_policies(None),
            schedule_interval=None, carbon_intensity_g_per_kwh=CARBON_INTENSITY_G_PER_KWH, energy_budget_wh=None,
            max_load_per_core=MAX_LOAD_PER_CORE, carbon_caution_g_per_kwh=CARBON_CAUTION_G_PER_KWH,
            carbon_pause_g_per_kwh=500.0, max_pending_approvals=3, retry_after=timedelta(minutes=30))
        self.state = evolution.initial_state()

    def handle(self, event: Envelope) -> list[NewEvent]:
        if event.aggregate_type not in self.READS:
            return []
        if event.type in ("cycle.requested", "research.requested"):
            return self._request(event)
        if event.type == "dataset.registered" and event.payload.get("auto_cycle") is False:
            self.state = evolution.evolve(self.state, event)
            return []
        self.state, events = evolution.handle(event, self.state, self.config)
        return events

    def _request(self, event: Envelope) -> list[NewEvent]:
        kind = evolution.RequestCycle if event.type == "cycle.requested" else evolution.RequestResearch
        model = event.payload.get("model")
        config = replace(self.config, model=model) if model else self.config
        try:
            self.state, events = evolution.handle(_command(event, kind), self.state, config)
        except evolution.CommandRejected as exc:
            return [NewEvent(f"{event.aggregate_type}.request_refused", event.aggregate_id,
                             {"command_id": event.aggregate_id, "operator_id": event.payload.get("operator_id"),
                              "reason": str(exc)})]
        return events


def _command(event: Envelope, kind: type) -> Any:
    payload = dict(event.payload)
    fields = {"operator_id": payload.pop("operator_id"), "requested_at": event.occurred_at,
              "command_id": event.aggregate_id}
    for name in ("dataset_id", "config", "warm_start", "adapter_sha256"):
        if payload.get(name) is not None and name in kind.__dataclass_fields__:
            fields[name] = payload[name]
    return kind(**fields)


class RegistryReplay:
    """services/registry/app.py: promotions, rollbacks and profiles, on every event others wrote."""

    def __init__(self, keyring: Keyring) -> None:
        self.config = registry.RegistryConfig(keyring=keyring)
        self.state = registry.initial_state()

    def handle(self, event: Envelope) -> list[NewEvent]:
        if event.type not in registry.RELEVANT or event.producer.service == "registry":
            return []
        self.state, events = registry.handle(event, self.state, self.config)
        return events


class TrainerReplay:
    """services/trainer/app.py: datasets it hears of, and a request becoming a job (the job itself is not run)."""

    def __init__(self) -> None:
        self.state = trainer.initial_state()

    def handle(self, event: Envelope) -> list[NewEvent]:
        if event.type == "dataset.registered":
            self.state = trainer.evolve(self.state, event)
            return []
        if event.type != "training.requested":
            return []
        events = trainer.decide(event, self.state)
        self.state = _fold(trainer.evolve, trainer.evolve(self.state, event), events, event.occurred_at)
        return events


class ValidatorReplay:
    """services/validator/app.py: a trained candidate starts a soak (the soak itself is not run), sized
    by the energy service's advice, against the adapter in production."""

    def __init__(self) -> None:
        self.thresholds = Thresholds.default()
        self.state = validator.initial_state(SOAK_PLAN, self.thresholds)

    def handle(self, event: Envelope) -> list[NewEvent]:
        if event.type == "training.completed":
            events = validator.decide(event, self.state)
            self.state = _fold(validator.evolve, self.state, events, event.occurred_at)
            return events
        if event.type == "scaling.recommended" and event.payload.get("node") in (None, NODE):
            plan = SOAK_PLAN.fitted(event.payload.get("validator_replicas"), self.thresholds.min_samples,
                                    event.event_id)
            self.state = replace(self.state, plan=plan)
        elif event.type == "adapter.promoted":
            self.state = validator.evolve(self.state, event)
        elif event.type == "adapter.rolled_back":
            kind = event.payload.get("kind", "mntp")
            baseline = validator.Baseline("production", event.payload["adapter_sha256"],
                                          event.payload.get("adapter_uri"))
            self.state = replace(self.state, production={**self.state.production, kind: baseline})
        return []


def read_events(path: str | Path) -> list[Envelope]:
    """The export's events as a service reads a record: validated against its schema and upcast."""
    return [decode(line.encode()) for line in Path(path).read_text().splitlines() if line.strip()]


def operator_key(operator_id: str) -> Ed25519PrivateKey:
    """The replay's key for a recording operator: the same on every run, derived from ``SEED``."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(SEED + b"/" + operator_id.encode()).digest())


def recording_keyring() -> Keyring:
    """The recording's operators, with their roles, holding the replay's keys."""
    keyring = Keyring()
    for operator_id, roles in OPERATORS.items():
        keyring.add(operator_id, public_key_b64(operator_key(operator_id)), roles, created_at=OPERATORS_SINCE)
    return keyring


def resign(events: list[Envelope]) -> list[Envelope]:
    """``events`` with every operator decision that signs no subject signed again by ``operator_key``:
    the same fields, plus the subject of the request it answers (``decision_subject``)."""
    requests: dict[str, tuple[str, dict]] = {}  # request id -> (kind, subject), from approval.requested
    out = []
    for event in events:
        p = event.payload
        if event.type == "approval.requested":
            requests[p["request_id"]] = (p["kind"], p.get("subject") or {})
        field = {"approval.decision_submitted": "signed", "approval.granted": "decision"}.get(event.type)
        decision = p.get(field) if field else None
        if isinstance(decision, dict) and "subject" not in decision:
            kind, subject = requests[decision["request_id"]]
            again = sign_decision(decision["request_id"], decision["decision"], decision["operator_id"],
                                  operator_key(decision["operator_id"]), decision["issued_at"],
                                  decision["expires_at"], nonce=decision["nonce"], reason=decision["reason"],
                                  extra=decision["extra"], subject=decision_subject(kind, subject))
            event = event.with_payload({**p, field: again}, event.schema_version)
        out.append(event)
    return out


def read_models(events: list[Envelope]) -> dict[str, dict[str, Any]]:
    """Each registry table rebuilt from ``events`` into a fresh SQLite file: its digest and row count."""
    projections = all_projections()
    with tempfile.TemporaryDirectory(prefix="golden-replay-") as tmp:
        engine = create_engine(f"sqlite:///{tmp}/registry.db")
        try:
            rebuild(engine, projections, events)
            with Session(engine) as session:
                tables = {}
                for table in (t for projection in projections for t in projection.tables):
                    digest, rows = table_digest(session, table, VOLATILE_COLUMNS)
                    tables[table.__tablename__] = {"digest": digest, "rows": rows}
        finally:
            engine.dispose()
    return tables


def _plain(new: NewEvent) -> dict[str, Any]:
    return {"type": new.type, "aggregate_type": new.aggregate_type, "aggregate_id": new.aggregate_id,
            "payload": json.loads(json.dumps(new.payload))}


def _stable_ids(emitted: dict[str, list[dict]], recorded: set[str]) -> dict[str, list[dict]]:
    """Uuids made during the replay become <uuid-N> in order of appearance; the export's own stay."""
    made: dict[str, str] = {}

    def placeholder(match: re.Match) -> str:
        value = match.group(0)
        if value in recorded:
            return value
        return made.setdefault(value, f"<uuid-{len(made) + 1}>")

    return json.loads(UUID.sub(placeholder, json.dumps(emitted)))


def replay(events_path: str | Path) -> dict[str, Any]:
    """What each service's domain makes of the recorded events (their decisions re-signed, ``resign``),
    and the registry's rebuilt read models."""
    recorded = read_events(events_path)
    events = resign(recorded)
    keyring = recording_keyring()
    services = {"approval": ApprovalReplay(keyring), "energy": EnergyReplay(), "evolution": EvolutionReplay(keyring),
                "registry": RegistryReplay(keyring), "trainer": TrainerReplay(), "validator": ValidatorReplay()}
    emitted: dict[str, list[dict]] = {name: [] for name in services}
    for event in events:
        for name, service in services.items():
            emitted[name] += [_plain(new) for new in service.handle(event)]
    uuids = set(UUID.findall(Path(events_path).read_text()))
    # the read models are the projection of the log as recorded: projecting checks no signature
    return {"events": len(events), "emitted": _stable_ids(emitted, uuids), "read_models": read_models(recorded)}


def dumps(result: dict[str, Any]) -> str:
    """``result`` as expected.json holds it: indented, keys sorted."""
    return json.dumps(result, indent=2, sort_keys=True) + "\n"
