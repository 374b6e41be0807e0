"""Trust rules: operator keyrings and signed decisions (Ed25519), with no I/O.

Approval, evolution and the registry all have to agree on what makes a
decision authentic and what it may act on, so the rules live here once
(reading and writing key files is ``shared.keys``):

- The keyring is a JSON file of operators, each with a raw Ed25519 public key
  (base64) and roles (``requester``, ``approver``, ``admin``). Roles are
  checked exactly: ``admin`` manages the keyring and signs rollbacks, it does
  not silently imply ``approver``.
- A decision is a dict of ``SIGNED_FIELDS`` plus ``signature``. The signature
  covers ``canonical_json`` of exactly those fields, so any change after
  signing (or any field added beside them) fails verification.
- Every service that acts on a decision makes the same two checks, in order:
  ``verify_decision`` (is it authentic? shape, operator, signature, role and
  validity window; no state needed) and ``check_binding`` (may it act here? the
  kind of decision, the request it names, not signed by whoever asked, and a
  nonce never seen before; the caller supplies what it knows of the request).

Keyring file::

    {"operators": {"alice": {"public_key": "<base64 32 bytes>",
                             "roles": ["approver"],
                             "created_at": "2025-01-01T00:00:00Z"}}}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.contracts.values import iso, parse_time, utcnow

ROLES = ("requester", "approver", "admin")

# The scheme tag is signed with the rest so a signature made for a decision
# can never be presented as a signature over some other kind of document.
SCHEME = "neurons-decision/v1"
SIGNED_FIELDS = (
    "scheme",
    "request_id",
    "decision",
    "operator_id",
    "issued_at",
    "expires_at",
    "nonce",
    "reason",
    "extra",
    "subject",
)
SIGNATURE_FIELD = "signature"

# A decision as it travels: the SIGNED_FIELDS plus ``signature`` (base64).
SignedDecision = dict[str, Any]

_OPERATOR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


class KeyringError(ValueError):
    """The keyring file or an operator entry is not usable."""


# --- canonical form ---------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """The bytes that get signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


# --- keys ---------------------------------------------------------------------


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def decode_public_key(value: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyringError(f"public key is not base64: {exc}") from None
    if len(raw) != 32:
        raise KeyringError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class Operator:
    operator_id: str
    public_key: str
    roles: tuple[str, ...]
    created_at: str

    def has_role(self, role: str) -> bool:
        return role in self.roles

    def verifier(self) -> Ed25519PublicKey:
        return decode_public_key(self.public_key)

    def to_dict(self) -> dict[str, Any]:
        return {"public_key": self.public_key, "roles": list(self.roles), "created_at": self.created_at}


def _check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    roles = tuple(dict.fromkeys(roles))
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise KeyringError(f"unknown roles {unknown}; known: {list(ROLES)}")
    if not roles:
        raise KeyringError("an operator needs at least one role")
    return roles


@dataclass
class Keyring:
    """Operators allowed to sign, by id."""

    operators: dict[str, Operator] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Keyring":
        keyring = cls()
        for operator_id, entry in (data.get("operators") or {}).items():
            keyring.add(operator_id, entry["public_key"], entry.get("roles", ()),
                        created_at=entry.get("created_at"))
        return keyring

    def to_dict(self) -> dict[str, Any]:
        return {"operators": {oid: op.to_dict() for oid, op in sorted(self.operators.items())}}

    def add(self, operator_id: str, public_key: str, roles: Iterable[str], *,
            created_at: datetime | str | None = None, replace: bool = False) -> Operator:
        """Add an operator; an existing id is only overwritten with ``replace=True`` (key rotation)."""
        if not _OPERATOR_ID.match(operator_id or ""):
            raise KeyringError(f"bad operator id {operator_id!r}")
        if operator_id in self.operators and not replace:
            raise KeyringError(f"operator {operator_id!r} is already in the keyring")
        decode_public_key(public_key)
        created = iso(parse_time(created_at)) if created_at is not None else iso(utcnow())
        operator = Operator(operator_id, public_key, _check_roles(roles), created)
        self.operators[operator_id] = operator
        return operator

    def get(self, operator_id: str) -> Operator | None:
        return self.operators.get(operator_id)

    def __contains__(self, operator_id: object) -> bool:
        return operator_id in self.operators


# --- decisions ------------------------------------------------------------


def sign_decision(
    request_id: str,
    decision: str,
    operator_id: str,
    private_key: Ed25519PrivateKey,
    issued_at: datetime | str,
    expires_at: datetime | str,
    nonce: str | None = None,
    reason: str | None = None,
    extra: Mapping[str, Any] | None = None,
    subject: Mapping[str, Any] | None = None,
) -> SignedDecision:
    """Sign ``decision`` ("grant", "reject", "rollback", ...) on ``request_id``.

    ``private_key`` is the operator's key (``shared.keys.load_private_key``
    reads one from its file). ``subject`` is what the decision is about
    (``decision_subject``): the adapter, validation and channel of a
    promotion, the cycle and the digest of its configuration for training.
    ``nonce`` defaults to 128 random bits. Returns the signed fields plus ``signature``.
    """
    if not request_id or not decision or not operator_id:
        raise ValueError("request_id, decision and operator_id are required")
    body = {
        "scheme": SCHEME,
        "request_id": request_id,
        "decision": decision,
        "operator_id": operator_id,
        "issued_at": iso(parse_time(issued_at)),
        "expires_at": iso(parse_time(expires_at)),
        "nonce": nonce if nonce is not None else secrets.token_hex(16),
        "reason": reason,
        "extra": dict(extra) if extra is not None else {},
        "subject": dict(subject) if subject is not None else {},
    }
    signature = private_key.sign(canonical_json(body))
    return {**body, SIGNATURE_FIELD: base64.b64encode(signature).decode("ascii")}


def signed_body(signed: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a decision that the signature covers."""
    return {name: signed[name] for name in SIGNED_FIELDS if name in signed}


@dataclass(frozen=True)
class VerificationResult:
    ok: bool
    reason: str | None = None  # a stable code: "bad_signature", "expired", ...
    detail: str = ""
    operator_id: str | None = None  # the claimed operator, when the decision names one

    def __bool__(self) -> bool:
        return self.ok


def _refuse(reason: str, detail: str, operator_id: Any = None) -> VerificationResult:
    return VerificationResult(False, reason, detail, operator_id if isinstance(operator_id, str) else None)


def _shape_error(signed: Any) -> str | None:
    if not isinstance(signed, Mapping):
        return "a decision is a JSON object"
    expected = set(SIGNED_FIELDS) | {SIGNATURE_FIELD}
    missing = sorted(expected - set(signed))
    if missing:
        return f"missing fields {missing}"
    unexpected = sorted(set(signed) - expected)
    if unexpected:
        # Unsigned fields would travel with the decision looking as if signed.
        return f"unsigned fields {unexpected}"
    if signed["scheme"] != SCHEME:
        return f"scheme {signed['scheme']!r} is not {SCHEME!r}"
    for name in ("request_id", "decision", "operator_id", "issued_at", "expires_at", "nonce", SIGNATURE_FIELD):
        if not isinstance(signed[name], str) or not signed[name]:
            return f"{name} must be a non-empty string"
    if signed["reason"] is not None and not isinstance(signed["reason"], str):
        return "reason must be a string or null"
    if not isinstance(signed["extra"], Mapping):
        return "extra must be an object"
    if not isinstance(signed["subject"], Mapping):
        return "subject must be an object"
    return None


def verify_decision(signed: Any, keyring: Keyring, *, now: datetime,
                    required_role: str | None = "approver") -> VerificationResult:
    """Check shape, operator, signature, role and ``issued_at <= now <= expires_at``.

    The signature is checked before the role so that an unauthenticated claim
    never learns anything about roles. Nonce reuse and self-approval are the
    caller's to check (they need state).
    """
    problem = _shape_error(signed)
    if problem:
        claimed = signed.get("operator_id") if isinstance(signed, Mapping) else None
        return _refuse("malformed", problem, claimed)
    operator_id = signed["operator_id"]
    operator = keyring.get(operator_id)
    if operator is None:
        return _refuse("unknown_operator", f"{operator_id!r} is not in the keyring", operator_id)
    try:
        signature = base64.b64decode(signed[SIGNATURE_FIELD], validate=True)
        operator.verifier().verify(signature, canonical_json(signed_body(signed)))
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return _refuse("bad_signature", "the signature does not match the decision and the operator's key",
                       operator_id)
    if required_role is not None and not operator.has_role(required_role):
        return _refuse("missing_role", f"{operator_id!r} lacks the {required_role!r} role", operator_id)
    try:
        issued_at = parse_time(signed["issued_at"])
        expires_at = parse_time(signed["expires_at"])
    except ValueError as exc:
        return _refuse("malformed", f"bad timestamp: {exc}", operator_id)
    now = parse_time(now)
    if expires_at < issued_at:
        return _refuse("malformed", "expires_at is before issued_at", operator_id)
    if now < issued_at:
        return _refuse("not_yet_valid", f"issued at {signed['issued_at']}, after now", operator_id)
    if now > expires_at:
        return _refuse("expired", f"the decision expired at {signed['expires_at']}", operator_id)
    return VerificationResult(True, None, "", operator_id)


def check_binding(signed: Mapping[str, Any], *, decisions: str | Iterable[str], request_id: str | None = None,
                  requested_by: str | None = None, used_nonces: Iterable[str] | set[str] = (),
                  subject: Mapping[str, Any] | None = None) -> VerificationResult:
    """Whether an authentic decision (``verify_decision`` passed) may act where it is presented.

    ``decisions`` is the kind (or kinds) the caller acts on; ``request_id`` the
    request it answers, when the caller knows one; ``requested_by`` who asked;
    ``used_nonces`` the nonces the caller has already acted on; ``subject``
    what the caller is about to act on (``decision_subject``), which the
    decision must have signed.
    """
    operator_id = signed.get("operator_id")
    wanted = (decisions,) if isinstance(decisions, str) else tuple(decisions)
    if signed.get("decision") not in wanted:
        reason = f"not_a_{wanted[0]}" if len(wanted) == 1 else "unsupported_decision"
        return _refuse(reason, f"the signed decision is {signed.get('decision')!r}, not one of {sorted(wanted)}",
                       operator_id)
    if request_id is not None and signed.get("request_id") != request_id:
        return _refuse("request_mismatch", f"the signed decision is for {signed.get('request_id')!r}, "
                       f"not {request_id!r}", operator_id)
    if subject is not None and dict(signed.get("subject") or {}) != dict(subject):
        return _refuse("subject_mismatch", f"the decision signed {dict(signed.get('subject') or {})}, "
                       f"not {dict(subject)}", operator_id)
    for check in (check_not_self_approval(signed, requested_by), check_nonce(signed, used_nonces)):
        if not check:
            return check
    return VerificationResult(True, None, "", operator_id)


def check_nonce(signed: Mapping[str, Any], used_nonces: Iterable[str] | set[str]) -> VerificationResult:
    """A nonce is good once: a second decision with the same nonce is a replay."""
    nonce = signed.get("nonce")
    if nonce in used_nonces:
        return _refuse("nonce_reused", f"nonce {nonce!r} was used before", signed.get("operator_id"))
    return VerificationResult(True, None, "", signed.get("operator_id"))


def check_not_self_approval(signed: Mapping[str, Any], requested_by: str | None) -> VerificationResult:
    """Whoever asked for something may not be the one who approves it."""
    operator_id = signed.get("operator_id")
    if requested_by is not None and requested_by in (operator_id, f"operator:{operator_id}"):
        return _refuse("self_approval", f"{operator_id!r} requested this and may not decide it", operator_id)
    return VerificationResult(True, None, "", operator_id)


# --- what a decision is about -----------------------------------------------


def config_digest(config: Mapping[str, Any] | None) -> str:
    """The SHA-256 of a training configuration's canonical JSON: what a training grant signs."""
    return hashlib.sha256(canonical_json(dict(config or {}))).hexdigest()


PRODUCTION_CHANNEL, RESEARCH_CHANNEL = "production", "research"


def promotion_channel(training_kind: str | None, from_research: bool = False) -> str:
    """The channel a passing candidate's promotion request names: a research loop's adapter (an RL
    adapter, or any adapter of a ``research.proposed`` loop) goes to ``research``, where it can be
    tried without touching what production serves; every other adapter to ``production``."""
    return RESEARCH_CHANNEL if from_research or training_kind == "rl" else PRODUCTION_CHANNEL


def decision_subject(kind: str, subject: Mapping[str, Any]) -> dict[str, Any]:
    """What a decision on a request of ``kind`` must sign, from the request's ``subject``.

    A promotion binds the adapter, the validation that passed it and the
    channel; a cycle or research grant binds the cycle and the digest of the
    configuration it will train with; a rollback the channel and the adapter.
    """
    if kind == "promotion":
        return {"adapter_sha256": subject.get("adapter_sha256"), "validation_id": subject.get("validation_id"),
                "channel": subject.get("channel") or "production"}
    if kind in ("cycle", "research"):
        return {"cycle_id": subject.get("cycle_id"), "config_digest": config_digest(subject.get("config"))}
    if kind == "rollback":
        return {"channel": subject.get("channel"), "adapter_sha256": subject.get("adapter_sha256")}
    raise ValueError(f"no decision subject for requests of kind {kind!r}")
