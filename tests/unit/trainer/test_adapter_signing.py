"""Adapter folders signed with OpenSSF model-signing (EC P-256, offline) and checked before use."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.adapter_signing import (
    NO_KEY_ANCHORED,
    SIGNATURE_NAME,
    AdapterSignatureError,
    sign_adapter,
    verify_adapter,
    verify_adapter_with,
)
from shared.artefacts import ADAPTER_SIGNATURE, ADAPTER_WEIGHTS, SUMMARY, ArtefactStore, SharedArtefacts
from shared.keys import ensure_service_keys, model_signing_key_path, model_signing_public_pem
from shared.settings import Settings

WEIGHTS = ADAPTER_WEIGHTS


def _write_key(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def key(tmp_path) -> tuple[Path, bytes]:
    """An EC P-256 key pair: the private key's file and the public key (PEM)."""
    private = ec.generate_private_key(ec.SECP256R1())
    return _write_key(tmp_path / "signing.pem", private), _public(private)


def _adapter(folder: Path, weights: bytes = b"\x00lora-weights" * 64) -> Path:
    folder.mkdir(parents=True)
    (folder / WEIGHTS).write_bytes(weights)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (folder / SUMMARY).write_text(json.dumps({"status": "trained"}))
    return folder


@pytest.fixture
def signed(tmp_path, key) -> Path:
    folder = _adapter(tmp_path / "adapter")
    assert sign_adapter(folder, key[0]) == folder / SIGNATURE_NAME
    return folder


def _refusal(folder: Path, public: bytes | None) -> AdapterSignatureError:
    with pytest.raises(AdapterSignatureError) as caught:
        verify_adapter(folder, public)
    return caught.value


def test_a_signed_folder_verifies_and_its_signature_is_a_sigstore_bundle(signed, key):
    verify_adapter(signed, key[1])
    bundle = json.loads((signed / SIGNATURE_NAME).read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["dsseEnvelope"]["signatures"]
    assert SIGNATURE_NAME == ADAPTER_SIGNATURE  # the store's layout and the signer agree on the name


def test_the_signature_file_is_not_part_of_what_is_signed(signed, key):
    sign_adapter(signed, key[0])  # signing again over an existing model.sig
    verify_adapter(signed, key[1])


def test_a_copy_under_another_name_still_verifies(signed, key, tmp_path):
    copy = shutil.copytree(signed, tmp_path / ("0" * 64))
    verify_adapter(copy, key[1])


def test_one_byte_changed_names_the_file(signed, key):
    weights = bytearray((signed / WEIGHTS).read_bytes())
    weights[100] ^= 0x01
    (signed / WEIGHTS).write_bytes(bytes(weights))
    error = _refusal(signed, key[1])
    assert WEIGHTS in str(error) and "modified" in str(error)
    assert error.modified == (WEIGHTS,) and error.files == (WEIGHTS,)


def test_an_unexpected_file_is_named(signed, key):
    (signed / "adapter_model.bin").write_bytes(b"pickled weights")
    error = _refusal(signed, key[1])
    assert "adapter_model.bin" in str(error) and error.extra == ("adapter_model.bin",)


def test_a_deleted_file_is_named(signed, key):
    (signed / "adapter_config.json").unlink()
    error = _refusal(signed, key[1])
    assert "adapter_config.json" in str(error) and "missing" in str(error)
    assert error.missing == ("adapter_config.json",)


def test_a_missing_signature_is_refused_clearly(tmp_path, key):
    folder = _adapter(tmp_path / "unsigned")
    error = _refusal(folder, key[1])
    assert "not signed" in str(error) and SIGNATURE_NAME in str(error)


def test_a_staging_file_of_a_copy_in_progress_does_not_fail_the_check(signed, key):
    (signed / ".incoming-abc123").write_bytes(b"half a file")
    verify_adapter(signed, key[1])
    (signed / SUMMARY).write_text("{}")  # but the signed files are still checked
    assert _refusal(signed, key[1]).modified == (SUMMARY,)


def test_without_an_anchored_key_nothing_verifies(signed):
    assert str(_refusal(signed, None)) == NO_KEY_ANCHORED
    assert str(_refusal(signed, b"")) == NO_KEY_ANCHORED


def test_a_signature_by_another_key_is_refused(signed):
    other = _public(ec.generate_private_key(ec.SECP256R1()))
    error = _refusal(signed, other)
    assert "another key" in str(error)


def test_a_forged_signature_is_refused(signed, key):
    bundle = json.loads((signed / SIGNATURE_NAME).read_text())
    envelope = bundle["dsseEnvelope"]
    raw = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    raw[-1] ^= 0x01
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    (signed / SIGNATURE_NAME).write_text(json.dumps(bundle))
    assert _refusal(signed, key[1]).modified == (SIGNATURE_NAME,)
    envelope["signatures"][0]["sig"] = "not base64!"
    (signed / SIGNATURE_NAME).write_text(json.dumps(bundle))
    assert _refusal(signed, key[1]).modified == (SIGNATURE_NAME,)
    (signed / SIGNATURE_NAME).write_text("not a signature")
    assert _refusal(signed, key[1]).modified == (SIGNATURE_NAME,)


def test_only_elliptic_curve_keys_sign(tmp_path):
    folder = _adapter(tmp_path / "adapter")
    with pytest.raises(AdapterSignatureError, match="EC P-256"):
        sign_adapter(folder, _write_key(tmp_path / "ed25519.pem", Ed25519PrivateKey.generate()))
    with pytest.raises(AdapterSignatureError, match="run neurons up"):
        sign_adapter(folder, tmp_path / "absent.pem")
    assert not (folder / SIGNATURE_NAME).exists()


# --- the store and the keys of the platform --------------------------------------------


def _settings(var: Path) -> Settings:
    return Settings(var_dir=var, bootstrap_servers=None, database_url=None, trust_path=var / "keys" / "trust.json",
                    service_key_dir=var / "keys" / "services")


def test_the_store_signs_the_folder_as_stored_with_the_platform_key(tmp_path):
    settings = _settings(tmp_path / "var")
    with pytest.raises(AdapterSignatureError, match="no adapter-signing key anchored; run neurons up"):
        verify_adapter_with(tmp_path, settings)
    ensure_service_keys(settings)
    store = ArtefactStore(tmp_path / "store")
    key = model_signing_key_path(settings)
    stored = store.put_adapter(_adapter(tmp_path / "run"), {"energy": {"joules": 3.0}},
                               sign=lambda folder: sign_adapter(folder, key))

    assert sorted(p.name for p in stored.path.iterdir()) == [
        "adapter_config.json", WEIGHTS, SIGNATURE_NAME, SUMMARY]
    verify_adapter(stored.path, model_signing_public_pem(settings))  # the summary as merged is what is signed
    summary = json.loads((stored.path / SUMMARY).read_text())
    summary["energy"] = {"joules": 0.0}
    (stored.path / SUMMARY).write_text(json.dumps(summary))
    with pytest.raises(AdapterSignatureError, match=SUMMARY):
        verify_adapter_with(stored.path, settings)


def test_an_adapter_stored_unsigned_is_signed_when_stored_again(tmp_path, key):
    store = ArtefactStore(tmp_path / "store")
    first = store.put_adapter(_adapter(tmp_path / "a"))
    assert not (first.path / SIGNATURE_NAME).exists()
    again = store.put_adapter(_adapter(tmp_path / "b"), sign=lambda folder: sign_adapter(folder, key[0]))
    assert again == first
    verify_adapter(first.path, key[1])


def test_the_signature_travels_with_the_adapter_between_stores(tmp_path, key):
    node_a = SharedArtefacts(ArtefactStore(tmp_path / "a"), ArtefactStore(tmp_path / "shared"))
    node_b = SharedArtefacts(ArtefactStore(tmp_path / "b"), ArtefactStore(tmp_path / "shared"))
    stored = node_a.local.put_adapter(_adapter(tmp_path / "run"), sign=lambda folder: sign_adapter(folder, key[0]))
    node_a.share(stored.uri)
    verify_adapter(node_b.get(stored.uri), key[1])
