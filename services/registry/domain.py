"""What the registry decides: promotions, rollbacks and personality profiles. Pure.

Promotion. An adapter goes into service on a channel (``production`` unless
the signed grant's ``extra.channel`` names another) only on an
``approval.granted`` of kind ``promotion`` whose signed decision verifies
against the keyring (operator known, signature good, ``approver`` role, valid
when granted, nonce fresh, not self-approved), for the adapter the approval
request was opened for, whose candidate validation passed and which is not a
fallback artefact. Anything less is recorded as ``adapter.promotion_refused``
and changes nothing. A grant that arrives before the validation it rests on
(the two travel on different topics) waits for it.

Rollback. ``adapter.rollback_requested`` carries a decision signed by an
``admin`` (decision ``rollback``, ``extra.channel`` and
``extra.adapter_sha256`` signed with it); the target must have served the
channel before. Outcome: ``adapter.rolled_back`` or ``adapter.rollback_refused``.

Profiles. ``profile.create_requested`` / ``profile.update_requested`` (with
the version the change was made against) lead to ``profile.created`` /
``profile.updated`` or ``profile.update_refused``. The version counts edits of
the profile; a new adapter on its channel (``profile.adapter_updated``) does
not bump it, so an operator's edit is not refused because of a promotion.

Every decision reads "now" from the event it answers, so the same log always
leads to the same decisions. Use ``handle(event, state, config)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Iterable, Mapping

from shared.contracts.envelope import NewEvent, iso
from shared.contracts.facts import occurred_at as _occurred_at
from shared.contracts.trust import Keyring, check_binding, decision_subject, parse_time, verify_decision

DEFAULT_CHANNEL = "production"
KINDS = ("mntp", "rl")
PROFILE_FIELDS = ("traits", "interaction_style", "context_preferences", "channel")


# --- state ---------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterFacts:
    """What a promotion needs to know about an adapter, from training and validation."""

    sha256: str
    uri: str | None = None
    kind: str = "mntp"
    cycle_id: str | None = None
    validation_id: str | None = None
    verdict: str | None = None
    fallback: bool | None = None  # None: no training.completed seen for it


@dataclass(frozen=True)
class Served:
    sha256: str
    uri: str
    kind: str


@dataclass(frozen=True)
class Channel:
    name: str
    current: Served | None = None
    served: tuple[Served, ...] = ()  # every adapter that ever served, oldest first


@dataclass(frozen=True)
class Profile:
    profile_id: str
    traits: Mapping[str, Any]
    interaction_style: str
    context_preferences: Mapping[str, Any]
    channel: str
    version: int
    requested_by: str
    active_adapter_sha256: str | None = None
    active_adapter_uri: str | None = None

    def body(self) -> dict[str, Any]:
        return {
            "profile_id": self.profile_id, "traits": dict(self.traits),
            "interaction_style": self.interaction_style,
            "context_preferences": dict(self.context_preferences), "channel": self.channel,
            "active_adapter_sha256": self.active_adapter_sha256, "active_adapter_uri": self.active_adapter_uri,
            "version": self.version, "requested_by": self.requested_by,
        }


@dataclass(frozen=True)
class PromotionRequest:
    request_id: str
    adapter_sha256: str | None
    requested_by: str | None
    channel: str | None = None
    validation_id: str | None = None


@dataclass(frozen=True)
class RegistryState:
    adapters: Mapping[str, AdapterFacts] = field(default_factory=dict)
    channels: Mapping[str, Channel] = field(default_factory=dict)
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    requests: Mapping[str, PromotionRequest] = field(default_factory=dict)
    # grants waiting for the validation they rest on, by request id: (payload, granted_at, event_id)
    parked: Mapping[str, tuple[Mapping[str, Any], str, str | None]] = field(default_factory=dict)
    acted_on: frozenset[str] = frozenset()  # promotion requests that promoted an adapter
    used_nonces: frozenset[str] = frozenset()

    def channel(self, name: str) -> Channel:
        return self.channels.get(name) or Channel(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapters": {k: vars(v) for k, v in sorted(self.adapters.items())},
            "channels": {k: {"name": c.name, "current": vars(c.current) if c.current else None,
                             "served": [vars(s) for s in c.served]} for k, c in sorted(self.channels.items())},
            "profiles": {k: {**p.body(), "traits": dict(p.traits),
                             "context_preferences": dict(p.context_preferences)}
                         for k, p in sorted(self.profiles.items())},
            "requests": {k: vars(r) for k, r in sorted(self.requests.items())},
            "parked": {k: {"payload": dict(p), "granted_at": at, "event_id": eid}
                       for k, (p, at, eid) in sorted(self.parked.items())},
            "acted_on": sorted(self.acted_on),
            "used_nonces": sorted(self.used_nonces),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "RegistryState":
        data = data or {}
        return cls(
            adapters={k: AdapterFacts(**v) for k, v in (data.get("adapters") or {}).items()},
            channels={k: Channel(c["name"], Served(**c["current"]) if c.get("current") else None,
                                 tuple(Served(**s) for s in c.get("served") or ()))
                      for k, c in (data.get("channels") or {}).items()},
            profiles={k: Profile(**p) for k, p in (data.get("profiles") or {}).items()},
            requests={k: PromotionRequest(**r) for k, r in (data.get("requests") or {}).items()},
            parked={k: (p["payload"], p["granted_at"], p.get("event_id")) for k, p in (data.get("parked") or {}).items()},
            acted_on=frozenset(data.get("acted_on") or ()),
            used_nonces=frozenset(data.get("used_nonces") or ()),
        )

    def to_rows(self) -> dict[str, dict[str, Any]]:
        """One row per adapter, channel, profile, promotion request, waiting grant, answered request and nonce."""
        data = self.to_dict()
        rows = {f"{prefix}:{key}": record for prefix, group in _ROW_GROUPS.items() for key, record in data[group].items()}
        rows.update({f"acted_on:{request_id}": {} for request_id in self.acted_on})
        rows.update({f"nonce:{nonce}": {} for nonce in self.used_nonces})
        return rows

    @classmethod
    def from_rows(cls, rows: Mapping[str, Mapping[str, Any]]) -> "RegistryState":
        data: dict[str, Any] = {group: {} for group in _ROW_GROUPS.values()}
        data.update(acted_on=[], used_nonces=[])
        for key, record in rows.items():
            prefix, name = key.split(":", 1)
            if prefix in _ROW_GROUPS:
                data[_ROW_GROUPS[prefix]][name] = record
            else:
                data["acted_on" if prefix == "acted_on" else "used_nonces"].append(name)
        return cls.from_dict(data)


_ROW_GROUPS = {"adapter": "adapters", "channel": "channels", "profile": "profiles", "request": "requests",
               "parked": "parked"}  # row key prefix -> the part of the state it holds


def initial_state() -> RegistryState:
    return RegistryState()


@dataclass(frozen=True)
class RegistryConfig:
    keyring: Keyring = field(default_factory=Keyring)
    approver_role: str = "approver"
    rollback_role: str = "admin"


# The event types that change the state or call for a decision; the rest only feed read models.
RELEVANT = frozenset({
    "validation.completed", "training.completed", "approval.requested", "approval.granted",
    "adapter.promoted", "adapter.promotion_refused", "adapter.rolled_back", "adapter.rollback_requested",
    "profile.create_requested", "profile.update_requested", "profile.created", "profile.updated",
    "profile.adapter_updated",
})


# --- evolve --------------------------------------------------------------------


def evolve(state: RegistryState, event: Any) -> RegistryState:
    """Fold one event into the state; events the registry does not track leave it as it is."""
    etype, p = event.type, event.payload
    if etype == "validation.completed":
        if p.get("purpose", "candidate") != "candidate" or not p.get("adapter_sha256"):
            return state  # a drift soak judges the adapter in service, not a candidate
        facts = _facts(state, p["adapter_sha256"])
        facts = replace(facts, uri=p.get("adapter_uri") or facts.uri, kind=p.get("kind") or facts.kind,
                        cycle_id=p.get("cycle_id") or facts.cycle_id, validation_id=p.get("validation_id"),
                        verdict=str(p.get("verdict") or "").lower() or None)
        return replace(state, adapters={**state.adapters, facts.sha256: facts})
    if etype == "training.completed":
        sha = p.get("adapter_sha256")
        if not sha:
            return state
        facts = _facts(state, sha)
        fallback = p.get("status") != "trained" or bool(p.get("fallback"))
        facts = replace(facts, uri=facts.uri or p.get("adapter_uri"), kind=p.get("kind") or facts.kind,
                        cycle_id=facts.cycle_id or p.get("cycle_id"), fallback=fallback)
        return replace(state, adapters={**state.adapters, sha: facts})
    if etype == "approval.granted" and p.get("kind") == "promotion":
        if p["request_id"] in state.acted_on:
            return state
        # it waits here until a promotion or a refusal answers it (``_release_parked``)
        parked = (dict(p), iso(_granted_at(event)), getattr(event, "event_id", None))
        return replace(state, parked={**state.parked, p["request_id"]: parked})
    if etype == "approval.requested" and p.get("kind") == "promotion":
        subject = p.get("subject") or {}
        request = PromotionRequest(p["request_id"], subject.get("adapter_sha256"), p.get("requested_by"),
                                   subject.get("channel"), subject.get("validation_id"))
        return replace(state, requests={**state.requests, request.request_id: request})
    if etype in ("adapter.promoted", "adapter.rolled_back"):
        served = Served(p["adapter_sha256"], p["adapter_uri"], p.get("kind") or "mntp")
        channel = state.channel(p["channel"])
        channel = replace(channel, current=served, served=channel.served + (served,))
        state = replace(state, channels={**state.channels, channel.name: channel})
        if etype == "adapter.promoted":
            request_id = p["approval_request_id"]
            return replace(state, acted_on=state.acted_on | {request_id},
                           parked={k: v for k, v in state.parked.items() if k != request_id})
        return _use_nonce(state, p.get("decision"))
    if etype == "adapter.promotion_refused":
        # A refusal does not close the request: a forged grant must not block the genuine one.
        return replace(state, parked={k: v for k, v in state.parked.items() if k != p["approval_request_id"]})
    if etype in ("profile.created", "profile.updated"):
        profile = Profile(
            profile_id=p["profile_id"], traits=dict(p["traits"]), interaction_style=p["interaction_style"],
            context_preferences=dict(p["context_preferences"]), channel=p["channel"], version=p["version"],
            requested_by=p["requested_by"], active_adapter_sha256=p.get("active_adapter_sha256"),
            active_adapter_uri=p.get("active_adapter_uri"))
        return replace(state, profiles={**state.profiles, profile.profile_id: profile})
    if etype == "profile.adapter_updated":
        profile = state.profiles.get(p["profile_id"])
        if profile is None:
            return state
        profile = replace(profile, active_adapter_sha256=p["adapter_sha256"], active_adapter_uri=p["adapter_uri"])
        return replace(state, profiles={**state.profiles, profile.profile_id: profile})
    return state


def _facts(state: RegistryState, sha: str) -> AdapterFacts:
    return state.adapters.get(sha) or AdapterFacts(sha)


def _use_nonce(state: RegistryState, signed: Any) -> RegistryState:
    if isinstance(signed, Mapping) and signed.get("nonce"):
        return replace(state, used_nonces=state.used_nonces | {signed["nonce"]})
    return state


# --- decide --------------------------------------------------------------------


def decide(event: Any, state: RegistryState, config: RegistryConfig) -> list[NewEvent]:
    etype = event.type
    if etype == "approval.granted" and event.payload.get("kind") == "promotion":
        return _on_promotion_grant(event.payload, _granted_at(event), getattr(event, "event_id", None),
                                   state, config)
    if etype in ("validation.completed", "training.completed"):
        return _release_parked(event.payload.get("adapter_sha256"), state, config)
    if etype == "adapter.rollback_requested":
        return _on_rollback(event, state, config)
    if etype == "profile.create_requested":
        return _on_create(event, state)
    if etype == "profile.update_requested":
        return _on_update(event, state)
    return []


def handle(event: Any, state: RegistryState, config: RegistryConfig) -> tuple[RegistryState, list[NewEvent]]:
    """Fold ``event``, decide, and fold what was decided (so the next event sees it at once)."""
    state = evolve(state, event)
    decided = decide(event, state, config)
    for new in decided:
        state = evolve(state, new)
    return state, decided


def replay(events: Iterable[Any], state: RegistryState | None = None) -> RegistryState:
    state = state if state is not None else initial_state()
    for event in events:
        state = evolve(state, event)
    return state


def _granted_at(event: Any) -> datetime:
    at = event.payload.get("granted_at")
    return parse_time(at) if at else _occurred_at(event)


# --- promotion ------------------------------------------------------------------


def _on_promotion_grant(payload: Mapping[str, Any], granted_at: datetime, event_id: str | None,
                        state: RegistryState, config: RegistryConfig) -> list[NewEvent]:
    request_id = payload["request_id"]
    if request_id in state.acted_on:
        return []  # a grant answers its request once; a replayed grant promotes nothing
    signed = payload.get("decision")
    request = state.requests.get(request_id)
    extra = signed.get("extra") if isinstance(signed, Mapping) and isinstance(signed.get("extra"), Mapping) else {}
    channel = extra.get("channel") or (request.channel if request else None) or DEFAULT_CHANNEL
    sha = request.adapter_sha256 if request else (payload.get("subject") or {}).get("adapter_sha256")

    def refuse(reason: str, detail: str, operator_id: str | None = None) -> list[NewEvent]:
        return [NewEvent("adapter.promotion_refused", channel, {
            "channel": channel, "approval_request_id": request_id, "adapter_sha256": sha,
            "reason": reason, "detail": detail, "operator_id": operator_id,
            "approval_event_id": event_id, "refused_at": iso(granted_at),
        })]

    if not isinstance(signed, Mapping):
        return refuse("unsigned", f"granted by {payload.get('actor')!r} without an operator's signed decision; "
                                  "a promotion needs one")
    verified = verify_decision(signed, config.keyring, now=granted_at, required_role=config.approver_role)
    if not verified:
        return refuse(verified.reason or "unverified", verified.detail, verified.operator_id)
    operator_id = verified.operator_id
    bound = check_binding(signed, decisions="grant", request_id=request_id,
                          requested_by=request.requested_by if request else None, used_nonces=state.used_nonces)
    if not bound:
        return refuse(bound.reason, bound.detail, operator_id)
    if request is None:
        return refuse("unknown_request", f"no promotion request {request_id!r} was opened", operator_id)
    # the decision must have signed this adapter, the validation that passed it and this channel
    bound = check_binding(signed, decisions="grant", subject=decision_subject(
        "promotion", {"adapter_sha256": sha, "validation_id": request.validation_id, "channel": channel}))
    if not bound:
        return refuse(bound.reason, bound.detail, operator_id)
    granted_sha = (payload.get("subject") or {}).get("adapter_sha256")
    if not sha or (granted_sha and granted_sha != sha):
        return refuse("subject_mismatch", f"the request was for adapter {sha}, the grant names {granted_sha}",
                      operator_id)
    facts = state.adapters.get(sha)
    if facts is None or facts.verdict is None:
        return []  # the validation is on its way on another topic: wait (see _release_parked)
    return _promote(payload, facts, channel, operator_id, granted_at, event_id, state, refuse)


def _promote(payload, facts: AdapterFacts, channel: str, operator_id: str, granted_at: datetime,
             event_id: str | None, state: RegistryState, refuse) -> list[NewEvent]:
    if facts.verdict != "pass":
        return refuse("validation_not_passed", f"validation {facts.validation_id} ended {facts.verdict!r}",
                      operator_id)
    if facts.fallback:
        return refuse("fallback_artefact", "a fallback artefact is not a trained adapter", operator_id)
    if not facts.uri:
        return refuse("unknown_artefact", f"no URI is known for adapter {facts.sha256}", operator_id)
    current = state.channel(channel).current
    if current is not None and current.sha256 == facts.sha256:
        return refuse("already_serving", f"{facts.sha256} already serves {channel}", operator_id)
    promoted = NewEvent("adapter.promoted", channel, {
        "channel": channel, "adapter_sha256": facts.sha256, "adapter_uri": facts.uri, "kind": facts.kind,
        "cycle_id": facts.cycle_id, "validation_id": facts.validation_id,
        "previous_adapter_sha256": current.sha256 if current else None,
        "previous_adapter_uri": current.uri if current else None,
        "approval_request_id": payload["request_id"], "approver": operator_id,
        "approval_event_id": event_id, "promoted_at": iso(granted_at), "decision": dict(payload["decision"]),
    })
    served = Served(facts.sha256, facts.uri, facts.kind)
    return [promoted, *_profiles_follow(channel, served, current, "adapter.promoted", granted_at, state,
                                        dict(payload["decision"]))]


def _release_parked(sha: str | None, state: RegistryState, config: RegistryConfig) -> list[NewEvent]:
    events: list[NewEvent] = []
    for request_id, (payload, granted_at, event_id) in sorted(state.parked.items()):
        request = state.requests.get(request_id)
        if request is None or request.adapter_sha256 != sha:
            continue
        decided = _on_promotion_grant(payload, parse_time(granted_at), event_id, state, config)
        for new in decided:
            state = evolve(state, new)
        events += decided
    return events


# --- rollback ---------------------------------------------------------------------


def _on_rollback(event: Any, state: RegistryState, config: RegistryConfig) -> list[NewEvent]:
    p = event.payload
    channel_name, sha, signed = p["channel"], p["adapter_sha256"], p["signed"]
    now = _occurred_at(event)
    request_id = signed.get("request_id") if isinstance(signed, Mapping) else None

    def refuse(reason: str, detail: str, operator_id: str | None = None) -> list[NewEvent]:
        return [NewEvent("adapter.rollback_refused", channel_name, {
            "channel": channel_name, "adapter_sha256": sha, "request_id": request_id, "reason": reason,
            "detail": detail, "operator_id": operator_id, "refused_at": iso(now),
        })]

    verified = verify_decision(signed, config.keyring, now=now, required_role=config.rollback_role)
    if not verified:
        return refuse(verified.reason or "unverified", verified.detail, verified.operator_id)
    operator_id = verified.operator_id
    bound = check_binding(signed, decisions="rollback", used_nonces=state.used_nonces,
                          subject=decision_subject("rollback", {"channel": channel_name, "adapter_sha256": sha}))
    if not bound:
        return refuse(bound.reason, bound.detail, operator_id)
    extra = signed.get("extra") or {}
    if extra.get("channel") != channel_name or extra.get("adapter_sha256") != sha:
        return refuse("target_mismatch", "the signature covers channel "
                      f"{extra.get('channel')!r} and adapter {extra.get('adapter_sha256')!r}", operator_id)
    channel = state.channel(channel_name)
    target = next((s for s in reversed(channel.served) if s.sha256 == sha), None)
    if target is None:
        return refuse("never_served", f"{sha} never served {channel_name}; only a promotion can put it there",
                      operator_id)
    if channel.current is not None and channel.current.sha256 == sha:
        return refuse("already_serving", f"{sha} already serves {channel_name}", operator_id)
    current = channel.current
    rolled = NewEvent("adapter.rolled_back", channel_name, {
        "channel": channel_name, "adapter_sha256": sha, "adapter_uri": target.uri, "kind": target.kind,
        "previous_adapter_sha256": current.sha256 if current else None,
        "previous_adapter_uri": current.uri if current else None,
        "operator_id": operator_id, "request_id": signed["request_id"], "reason": signed.get("reason"),
        "decision": dict(signed), "rolled_back_at": iso(now),
    })
    return [rolled, *_profiles_follow(channel_name, target, current, "adapter.rolled_back", now, state,
                                      dict(signed))]


def _profiles_follow(channel: str, served: Served, previous: Served | None, cause: str, now: datetime,
                     state: RegistryState, decision: Mapping[str, Any]) -> list[NewEvent]:
    """Every profile on ``channel`` moves to the adapter now serving it, carrying the signed decision that put it there."""
    return [
        NewEvent("profile.adapter_updated", profile.profile_id, {
            "profile_id": profile.profile_id, "channel": channel, "adapter_sha256": served.sha256,
            "adapter_uri": served.uri, "kind": served.kind,
            "previous_adapter_sha256": profile.active_adapter_sha256, "cause": cause,
            "version": profile.version, "updated_at": iso(now), "decision": dict(decision),
        })
        for profile in sorted(state.profiles.values(), key=lambda p: p.profile_id)
        if profile.channel == channel and profile.active_adapter_sha256 != served.sha256
    ]


# --- profiles -----------------------------------------------------------------------


def _profile_refused(profile_id: str, command: str, reason: str, detail: str, expected: int | None,
                     current: int | None, now: datetime) -> list[NewEvent]:
    return [NewEvent("profile.update_refused", profile_id, {
        "profile_id": profile_id, "command": command, "reason": reason, "detail": detail,
        "expected_version": expected, "current_version": current, "refused_at": iso(now),
    })]


def _requester(event: Any) -> str:
    """Who asks: the operator whose key signed the command (its producer), else the payload's name."""
    producer = getattr(getattr(event, "producer", None), "service", "") or ""
    return producer.removeprefix("operator:") if producer.startswith("operator:") else event.payload["requested_by"]


def _on_create(event: Any, state: RegistryState) -> list[NewEvent]:
    p, now = event.payload, _occurred_at(event)
    existing = state.profiles.get(p["profile_id"])
    if existing is not None:
        return _profile_refused(p["profile_id"], "create", "already_exists",
                                f"profile {p['profile_id']} exists at version {existing.version}",
                                None, existing.version, now)
    current = state.channel(p["channel"]).current
    profile = Profile(p["profile_id"], dict(p["traits"]), p["interaction_style"], dict(p["context_preferences"]),
                      p["channel"], 1, _requester(event), current.sha256 if current else None,
                      current.uri if current else None)
    return [NewEvent("profile.created", profile.profile_id, {**profile.body(), "created_at": iso(now)})]


def _on_update(event: Any, state: RegistryState) -> list[NewEvent]:
    p, now = event.payload, _occurred_at(event)
    profile_id, expected = p["profile_id"], p["expected_version"]
    profile = state.profiles.get(profile_id)
    if profile is None:
        return _profile_refused(profile_id, "update", "unknown_profile", f"no profile {profile_id}",
                                expected, None, now)
    if expected != profile.version:
        return _profile_refused(profile_id, "update", "stale_version",
                                f"the change was made against version {expected}, the profile is at "
                                f"version {profile.version}; show it again and retry", expected,
                                profile.version, now)
    changes = {k: v for k, v in p["changes"].items() if k in PROFILE_FIELDS}
    changed = sorted(k for k, v in changes.items() if getattr(profile, k) != v)
    updated = replace(profile, **changes, version=profile.version + 1, requested_by=_requester(event))
    if "channel" in changed:
        current = state.channel(updated.channel).current
        updated = replace(updated, active_adapter_sha256=current.sha256 if current else None,
                          active_adapter_uri=current.uri if current else None)
    return [NewEvent("profile.updated", profile_id, {**updated.body(), "changed": changed, "updated_at": iso(now)})]
