"""Signed envelopes and who may write what (Ed25519 over Merkle roots), with no I/O.

Every envelope carries a ``signature`` block. Its producer signs, once per
published batch of up to ``MAX_BATCH`` events, the root of a Merkle tree
(SHA-256) whose leaves are the events' canonical bytes: ``Envelope.to_json``
without the block. Each event carries its own inclusion proof, so it stays
verifiable on its own, in the archive and in exports; a consumer verifies a
root's signature once and caches it::

    "signature": {"alg": "ed25519-merkle-sha256/v1", "principal": "service:trainer",
                  "key_id": "<16 hex>", "root": "<base64 sha256>", "sig": "<base64 Ed25519>",
                  "index": 3, "size": 17, "path": ["<base64 sha256>", ...]}

The signed message names the principal, the key id, the batch size and the
root, so a signature cannot be relabelled to another principal.

A principal is ``service:<name>`` or ``operator:<id>``. What each may
publish is the contract (``schemas.producers``): ``service:<name>`` entries
name services, ``operator:<role>`` entries an enrolled operator with that
role. ``check`` gives the reason a consumer refuses an event with, the same
words the dead-letter topic carries: ``unsigned``, ``bad_signature``,
``unknown_key``, ``revoked_key``, ``unauthorised_producer``.

Keys are known from two places (``TrustState``): the trust anchors
(services' keys and the first admins, from files, ``shared.keys``) and the
log, where an admin's signed ``operator.enrolled`` adds an operator's key and
``operator.revoked`` removes it from the time it was revoked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.contracts import schemas
from shared.contracts.envelope import Envelope
from shared.contracts.values import iso, parse_time

ALG = "ed25519-merkle-sha256/v1"
MAX_BATCH = 64  # leaves per tree: a proof of at most 6 hashes, one signature per 64 events
REASONS = ("unsigned", "bad_signature", "unknown_key", "revoked_key", "unauthorised_producer",
           "unapproved")  # the last: an adapter put in service without a valid operator's decision (trust_view)
_DOMAIN = b"neurons-envelope-batch/v1\x00"
_BLOCK_FIELDS = frozenset({"alg", "principal", "key_id", "root", "sig", "index", "size", "path"})


class Refused(ValueError):
    """An event its consumer must not act on; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- keys -----------------------------------------------------------------


def raw_public(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(public_key_b64: str) -> str:
    """A key's id: the first 8 bytes of the SHA-256 of its raw public key, in hex."""
    return hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """A principal and its private key: what a publisher signs with."""

    principal: str
    private_key: Ed25519PrivateKey = field(repr=False)

    @property
    def public_key(self) -> str:
        return base64.b64encode(raw_public(self.private_key)).decode("ascii")

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)


@dataclass(frozen=True)
class KeyRecord:
    """One known key: whose it is, the roles it holds, and when it was valid."""

    key_id: str
    principal: str
    public_key: str
    roles: tuple[str, ...] = ()
    valid_from: str | None = None  # ISO time; None: since always (an anchor)
    revoked_at: str | None = None
    anchor: bool = False

    def valid_at(self, when: datetime | None) -> bool:
        if when is None or self.revoked_at is None:
            return self.revoked_at is None
        return parse_time(when) < parse_time(self.revoked_at)

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "principal": self.principal, "public_key": self.public_key,
                "roles": list(self.roles), "valid_from": self.valid_from, "revoked_at": self.revoked_at,
                "anchor": self.anchor}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KeyRecord":
        return cls(data["key_id"], data["principal"], data["public_key"], tuple(data.get("roles") or ()),
                   data.get("valid_from"), data.get("revoked_at"), bool(data.get("anchor")))


@dataclass
class TrustState:
    """Every key a consumer knows, by key id: the anchors, and the operators the log enrolled."""

    keys: dict[str, KeyRecord] = field(default_factory=dict)

    @classmethod
    def from_anchors(cls, anchors: Mapping[str, Any]) -> "TrustState":
        """``anchors`` is the trust file: ``{"services": {name: {"public_key": b64}},
        "admins": {operator_id: {"public_key": b64}}}``."""
        state = cls()
        for name, entry in (anchors.get("services") or {}).items():
            state.add(KeyRecord(key_id_of(entry["public_key"]), f"service:{name}", entry["public_key"], anchor=True))
        for name, entry in (anchors.get("admins") or {}).items():
            state.add(KeyRecord(key_id_of(entry["public_key"]), f"operator:{name}", entry["public_key"],
                                ("admin",), anchor=True))
        return state

    def add(self, record: KeyRecord) -> None:
        self.keys[record.key_id] = record

    def get(self, key_id: str) -> KeyRecord | None:
        return self.keys.get(key_id)

    def operator_keys(self, when: datetime | None = None) -> dict[str, KeyRecord]:
        """Each operator's key valid at ``when`` (now when None), by operator id; a later enrolment wins."""
        found: dict[str, KeyRecord] = {}
        for record in self.keys.values():
            if record.principal.startswith("operator:") and record.valid_at(when):
                if when is not None and record.valid_from and parse_time(record.valid_from) > parse_time(when):
                    continue
                name = record.principal.split(":", 1)[1]
                held = found.get(name)
                if held is None or (record.valid_from or "") >= (held.valid_from or ""):
                    found[name] = record
        return found

    def to_rows(self) -> dict[str, dict[str, Any]]:
        return {key_id: record.to_dict() for key_id, record in self.keys.items() if not record.anchor}

    def with_rows(self, rows: Mapping[str, Mapping[str, Any]]) -> "TrustState":
        """These anchors plus the enrolled keys in ``rows`` (what ``to_rows`` wrote)."""
        state = TrustState(dict(self.keys))
        for key_id, data in rows.items():
            if key_id not in state.keys:
                state.keys[key_id] = KeyRecord.from_dict(data)
        return state


def fold_operator_event(state: TrustState, event_type: str, payload: Mapping[str, Any], signer: str,
                        occurred_at: datetime) -> TrustState:
    """``state`` after an authorised ``operator.enrolled`` or ``operator.revoked`` (``check`` passed)."""
    if event_type == "operator.enrolled":
        key_id = key_id_of(payload["public_key"])
        if key_id != payload["key_id"] or key_id in state.keys:
            return state  # a key id that is not the key's, or a key enrolled before: nothing changes
        state.add(KeyRecord(key_id, f"operator:{payload['operator_id']}", payload["public_key"],
                            tuple(payload["roles"]), valid_from=iso(occurred_at)))
    elif event_type == "operator.revoked":
        record = state.get(payload["key_id"])
        if record is not None and record.principal == f"operator:{payload['operator_id']}" and record.revoked_at is None:
            state.keys[record.key_id] = replace(record, revoked_at=iso(occurred_at))
    return state


# --- who may write what ---------------------------------------------------


def authorised(principal: str, roles: Iterable[str], allowed: Sequence[str]) -> bool:
    """Whether ``principal`` (holding ``roles``, for an operator) may publish a type whose contract allows ``allowed``."""
    if principal.startswith("service:"):
        return principal in allowed
    if principal.startswith("operator:"):
        held = set(roles)
        return any(entry.startswith("operator:") and entry.split(":", 1)[1] in held for entry in allowed)
    return False


# --- the Merkle batch -----------------------------------------------------


def _leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _message(principal: str, key_id: str, size: int, root: bytes) -> bytes:
    return _DOMAIN + f"{principal}\x00{key_id}\x00{size}\x00".encode() + root


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sign_batch(signer: Signer, canonical: Sequence[bytes]) -> list[dict[str, Any]]:
    """One signature block per event of ``canonical`` (at most ``MAX_BATCH``), all under one signed root."""
    size = len(canonical)
    if not 0 < size <= MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} events, not {size}")
    levels = [[_leaf(data) for data in canonical]]
    while len(levels[-1]) > 1:
        level = levels[-1]
        up = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])  # an odd node out goes up unchanged
        levels.append(up)
    root = levels[-1][0]
    key_id = signer.key_id
    sig = _b64(signer.private_key.sign(_message(signer.principal, key_id, size, root)))
    blocks = []
    for index in range(size):
        path, i = [], index
        for level in levels[:-1]:
            sibling = i - 1 if i % 2 else i + 1
            if sibling < len(level):
                path.append(_b64(level[sibling]))
            i //= 2
        blocks.append({"alg": ALG, "principal": signer.principal, "key_id": key_id, "root": _b64(root),
                       "sig": sig, "index": index, "size": size, "path": path})
    return blocks


def _root_from(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes | None:
    h, i, n, k = leaf, index, size, 0
    while n > 1:
        if i % 2:
            if k >= len(path):
                return None
            h, k = _node(path[k], h), k + 1
        elif i + 1 < n:
            if k >= len(path):
                return None
            h, k = _node(h, path[k]), k + 1
        i, n = i // 2, (n + 1) // 2
    return h if k == len(path) else None


class RootCache:
    """Roots whose signature was verified: a batch's signature is checked once, not per event."""

    def __init__(self, capacity: int = 4096) -> None:
        self._seen: OrderedDict[tuple[str, str, str, str, int], None] = OrderedDict()
        self.capacity = capacity

    def __contains__(self, key: tuple) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        return False

    def add(self, key: tuple) -> None:
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)


def _block_error(block: Any) -> str | None:
    if not isinstance(block, Mapping) or set(block) != _BLOCK_FIELDS:
        return "the signature block does not have the fields " + ", ".join(sorted(_BLOCK_FIELDS))
    if block["alg"] != ALG:
        return f"unknown signature algorithm {block['alg']!r}"
    for name in ("principal", "key_id", "root", "sig"):
        if not isinstance(block[name], str):
            return f"{name} is not a string"
    size, index, path = block["size"], block["index"], block["path"]
    if (type(size) is not int or type(index) is not int or not 0 < size <= MAX_BATCH or not 0 <= index < size
            or not isinstance(path, list) or len(path) > 8):
        return "the inclusion proof is malformed"
    return None


def check(envelope_type: str, signature: Any, canonical: bytes, trust: TrustState, *,
          allowed: Sequence[str], when: datetime | None = None, cache: RootCache | None = None) -> KeyRecord:
    """The key that signed the event, if it may act on it; else ``Refused`` with the reason.

    ``canonical`` is the envelope's bytes without its signature block;
    ``allowed`` the contract's producers for ``envelope_type``; ``when`` the
    time the key must be valid at (None: now, so a revoked key is refused).
    """
    if signature is None:
        raise Refused("unsigned", f"{envelope_type} carries no signature")
    problem = _block_error(signature)
    if problem:
        raise Refused("bad_signature", problem)
    record = trust.get(signature["key_id"])
    if record is None:
        raise Refused("unknown_key", f"key {signature['key_id']} ({signature['principal']}) is not known")
    if record.principal != signature["principal"]:
        raise Refused("bad_signature", f"key {record.key_id} belongs to {record.principal}, "
                                       f"not {signature['principal']}")
    if not record.valid_at(when):
        raise Refused("revoked_key", f"key {record.key_id} of {record.principal} was revoked at {record.revoked_at}")
    try:
        root = base64.b64decode(signature["root"], validate=True)
        path = [base64.b64decode(p, validate=True) for p in signature["path"]]
    except (binascii.Error, ValueError, TypeError):
        raise Refused("bad_signature", "the root or the proof is not base64") from None
    if _root_from(_leaf(canonical), signature["index"], signature["size"], path) != root:
        raise Refused("bad_signature", "the event is not the one that was signed (its proof does not reach the root)")
    cache_key = (record.key_id, signature["root"], signature["sig"], record.principal, signature["size"])
    if cache is None or cache_key not in cache:
        try:
            sig = base64.b64decode(signature["sig"], validate=True)
            Ed25519PublicKey.from_public_bytes(base64.b64decode(record.public_key)).verify(
                sig, _message(record.principal, record.key_id, signature["size"], root))
        except (InvalidSignature, binascii.Error, ValueError, TypeError):
            raise Refused("bad_signature", f"the signature does not verify with key {record.key_id}") from None
        if cache is not None:
            cache.add(cache_key)
    if not authorised(record.principal, record.roles, allowed):
        raise Refused("unauthorised_producer", f"{record.principal} (roles {', '.join(record.roles) or 'none'}) "
                                               f"may not publish {envelope_type}; allowed: {', '.join(allowed)}")
    return record


# --- envelopes ----------------------------------------------------------------


def check_envelope(envelope: Envelope, trust: TrustState, *, when: datetime | None = None,
                   cache: RootCache | None = None) -> str:
    """The principal that signed ``envelope`` if it may have published it; ``Refused`` otherwise."""
    record = check(envelope.type, envelope.signature, envelope.unsigned_json(), trust,
                   allowed=schemas.producers().get(envelope.type, ()), when=when, cache=cache)
    named = envelope.producer.service
    expected = record.principal.split(":", 1)[1] if record.principal.startswith("service:") else record.principal
    if named != expected:
        raise Refused("unauthorised_producer", f"signed by {record.principal} but names producer {named!r}")
    return record.principal


def fold_operator_events(trust: TrustState, events: list[Envelope], *, when_signed: bool = False) -> TrustState:
    """``trust`` with the authorised enrolments and revocations of ``events`` folded in, oldest first.

    An enrolment may be signed by an admin that another one enrolled (read in
    any order from several partitions): events are tried again until a pass
    admits nothing new. ``when_signed`` checks each key at the event's own time
    (an audit); otherwise a revoked key admits nothing.
    """
    pending = sorted((e for e in events if e.aggregate_type == "operator"), key=lambda e: e.occurred_at)
    progress = True
    while pending and progress:
        progress, left = False, []
        for envelope in pending:
            try:
                principal = check_envelope(envelope, trust, when=envelope.occurred_at if when_signed else None)
            except Refused:
                left.append(envelope)
                continue
            fold_operator_event(trust, envelope.type, envelope.payload, principal, envelope.occurred_at)
            progress = True
        pending = left
    return trust
