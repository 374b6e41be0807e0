"""shared.contracts.trust: keyring files, operator keys, canonical JSON, signed decisions."""

from __future__ import annotations

import json
import stat
from datetime import timedelta

import pytest

from shared.contracts.trust import (
    Keyring,
    KeyringError,
    canonical_json,
    check_nonce,
    check_not_self_approval,
    public_key_b64,
    sign_decision,
    verify_decision,
)
from shared.keys import generate_operator, load_keyring, load_private_key, save_keyring


def test_canonical_json_sorts_keys_and_has_no_spaces():
    assert canonical_json({"b": 1, "a": {"d": [1, 2], "c": "é"}}) == '{"a":{"c":"é","d":[1,2]},"b":1}'.encode()


def test_generate_operator_writes_a_private_key_only_its_owner_can_read(tmp_path, now):
    ring_path, key_dir = tmp_path / "keys" / "keyring.json", tmp_path / "keys" / "private"

    private_path, public = generate_operator("erin", ["approver"], ring_path, key_dir)

    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    key = load_private_key(private_path)
    assert public_key_b64(key) == public
    ring = load_keyring(ring_path)
    assert ring.get("erin").public_key == public
    assert ring.get("erin").roles == ("approver",)
    signed = sign_decision("apr-1", "grant", "erin", load_private_key(private_path), now, now + timedelta(minutes=5))
    assert verify_decision(signed, ring, now=now).ok


def test_generate_operator_refuses_to_overwrite_an_operator(tmp_path):
    ring_path = tmp_path / "keyring.json"
    generate_operator("erin", ["approver"], ring_path, tmp_path)

    with pytest.raises(KeyringError):
        generate_operator("erin", ["approver"], ring_path, tmp_path)


def test_a_raw_base64_private_key_file_is_read_too(tmp_path, keys):
    import base64

    from cryptography.hazmat.primitives import serialization

    raw = keys["alice"].private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption())
    path = tmp_path / "alice.key"
    path.write_text(base64.b64encode(raw).decode())

    assert public_key_b64(load_private_key(path)) == public_key_b64(keys["alice"])


def test_the_keyring_round_trips_through_its_file(tmp_path, keyring):
    path = save_keyring(keyring, tmp_path / "ring.json")

    loaded = load_keyring(path)

    assert loaded.operators == keyring.operators
    assert set(json.loads(path.read_text())["operators"]) == {"alice", "bob", "carol", "dave"}


def test_a_missing_keyring_file_is_an_empty_keyring(tmp_path):
    assert load_keyring(tmp_path / "none.json").operators == {}


@pytest.mark.parametrize("operator_id, public_key, roles", [
    ("eve", "not base64!", ["approver"]),
    ("eve", "AAAA", ["approver"]),
    ("eve", None, ["king"]),
    ("eve", None, []),
    ("bad id", None, ["approver"]),
])
def test_the_keyring_refuses_unusable_entries(keys, operator_id, public_key, roles):
    ring = Keyring()
    with pytest.raises(KeyringError):
        ring.add(operator_id, public_key or public_key_b64(keys["alice"]), roles)


def test_a_known_operator_is_only_replaced_on_purpose(keyring, keys):
    with pytest.raises(KeyringError):
        keyring.add("alice", public_key_b64(keys["mallory"]), ["approver"])

    keyring.add("alice", public_key_b64(keys["mallory"]), ["approver"], replace=True)

    assert keyring.get("alice").public_key == public_key_b64(keys["mallory"])


def test_a_valid_decision_verifies_inside_its_window_only(keyring, keys, now):
    signed = sign_decision("apr-1", "grant", "alice", keys["alice"], now, now + timedelta(minutes=5), nonce="n")

    assert verify_decision(signed, keyring, now=now).ok
    assert verify_decision(signed, keyring, now=now + timedelta(minutes=5)).ok
    assert verify_decision(signed, keyring, now=now - timedelta(seconds=1)).reason == "not_yet_valid"
    assert verify_decision(signed, keyring, now=now + timedelta(minutes=5, seconds=1)).reason == "expired"


def test_the_required_role_is_checked_after_the_signature(keyring, keys, now):
    signed = sign_decision("apr-1", "rollback", "dave", keys["dave"], now, now + timedelta(minutes=5))

    assert verify_decision(signed, keyring, now=now).reason == "missing_role"
    assert verify_decision(signed, keyring, now=now, required_role="admin").ok
    forged = {**signed, "decision": "grant"}
    assert verify_decision(forged, keyring, now=now, required_role="admin").reason == "bad_signature"


def test_nonce_and_self_approval_rules(keys, now):
    signed = sign_decision("apr-1", "grant", "bob", keys["bob"], now, now + timedelta(minutes=5), nonce="n-7")

    assert check_nonce(signed, {"n-1"}).ok
    assert check_nonce(signed, {"n-7"}).reason == "nonce_reused"
    assert check_not_self_approval(signed, "alice").ok
    assert check_not_self_approval(signed, "bob").reason == "self_approval"
    assert check_not_self_approval(signed, "operator:bob").reason == "self_approval"


def test_timestamps_without_a_timezone_are_refused_when_signing(keys, now):
    with pytest.raises(ValueError):
        sign_decision("apr-1", "grant", "alice", keys["alice"], now.replace(tzinfo=None), now)
