"""Key files: trust anchors, services' and operators' private keys (the rules are ``shared.contracts.trust``
and ``shared.contracts.signing``).

The trust anchors file (``NEURONS_TRUST``, default ``var/keys/trust.json``)
is what every consumer trusts without asking the log::

    {"services": {"trainer": {"public_key": "<base64 Ed25519>"}, ...},
     "admins": {"root": {"public_key": "<base64 Ed25519>", "label": "..."}},
     "model_signing": {"trainer": "<PEM EC P-256 public key>"}}

``neurons up`` creates the services' keys of the embedded platform
(``ensure_service_keys``); in production the file and each service's
``NEURONS_SERVICE_KEY`` come from the deployment. The first admin is added
once, by ``neurons operator init-admin``. Every other operator is enrolled on
the log (``operator.enrolled``), signed by an admin.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Iterable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cryptography.hazmat.primitives.asymmetric import ec

from shared.contracts.signing import Signer, TrustState, key_id_of
from shared.contracts.trust import Keyring, KeyringError, public_key_b64

SERVICE_NAMES = ("trainer", "evolution", "approval", "validator", "energy", "registry", "serving")
MODEL_SIGNER = "trainer"  # the service that signs adapter folders (OpenSSF model-signing, EC P-256)


class MissingKey(KeyringError):
    """A private key that should be there is not; the message says how to make one."""


def load_keyring(path: str | os.PathLike) -> Keyring:
    """Read the keyring at ``path``; a missing file is an empty keyring."""
    path = Path(path)
    if not path.exists():
        return Keyring()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KeyringError(f"{path}: not JSON: {exc}") from None
    return Keyring.from_dict(data)


def save_keyring(keyring: Keyring, path: str | os.PathLike) -> Path:
    """Write the keyring atomically (a half-written keyring would lock everyone out)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(keyring.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Read an operator's private key: PKCS#8 PEM or the raw 32-byte seed in base64."""
    data = Path(path).read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyringError(f"{path} does not hold an Ed25519 key")
        return key
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"{path} is neither PEM nor base64") from None
    if len(seed) != 32:
        raise KeyringError(f"{path}: a raw Ed25519 key has 32 bytes, got {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed)


def generate_operator(name: str, roles: Iterable[str], keyring_path: str | os.PathLike,
                      key_dir: str | os.PathLike) -> tuple[Path, str]:
    """Create a key pair for ``name``: the private key (PEM, mode 0600) goes to
    ``key_dir/<name>.pem``, the public key into the keyring. Returns
    ``(private_key_path, public_key_b64)``. Refuses to overwrite either."""
    keyring = load_keyring(keyring_path)
    if name in keyring:
        raise KeyringError(f"operator {name!r} is already in {keyring_path}")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    key_dir = Path(key_dir)
    key_dir.mkdir(parents=True, exist_ok=True)
    private_path = key_dir / f"{name}.pem"
    # O_EXCL with the mode set at creation: the key is never readable by others,
    # not even for the instant a chmod afterwards would leave open.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
    finally:
        os.close(fd)
    os.chmod(private_path, 0o600)  # the umask may have removed bits, never added them; be explicit
    public = public_key_b64(key)
    keyring.add(name, public, roles)
    save_keyring(keyring, keyring_path)
    return private_path, public


# --- files ------------------------------------------------------------------


def _write_private(path: Path, pem: bytes) -> Path:
    """Write a private key with mode 0600 from the start; refuses to overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL with the mode set at creation: the key is never readable by others
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)
    return path


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_anchors(path: str | os.PathLike) -> dict:
    """The trust anchors file; a missing file anchors nothing."""
    path = Path(path)
    if not path.exists():
        return {"services": {}, "admins": {}, "model_signing": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KeyringError(f"{path}: not JSON: {exc}") from None
    for section in ("services", "admins", "model_signing"):
        data.setdefault(section, {})
    return data


def save_anchors(anchors: dict, path: str | os.PathLike) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(anchors, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


def trust_state(settings) -> TrustState:
    """The anchors as a ``TrustState``: what a consumer knows before it reads the log."""
    return TrustState.from_anchors(load_anchors(settings.trust_path))


def ensure_service_keys(settings, names: Iterable[str] = SERVICE_NAMES) -> list[str]:
    """Create the missing keys of ``names`` (and the adapter-signing key) and anchor their public keys.

    For the embedded platform: ``neurons up`` calls it before starting the
    services. Returns the names whose keys were made.
    """
    anchors = load_anchors(settings.trust_path)
    made = []
    for name in names:
        path = settings.service_key_dir / f"{name}.pem"
        if not path.exists():
            _write_private(path, _pem(Ed25519PrivateKey.generate()))
            made.append(name)
        public = public_key_b64(load_private_key(path))
        anchors["services"][name] = {"public_key": public, "key_id": key_id_of(public)}
    model_key = model_signing_key_path(settings)
    if not model_key.exists():
        _write_private(model_key, _pem(ec.generate_private_key(ec.SECP256R1())))
    public_pem = serialization.load_pem_private_key(model_key.read_bytes(), password=None).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    anchors["model_signing"][MODEL_SIGNER] = public_pem
    save_anchors(anchors, settings.trust_path)
    return made


def service_signer(settings, name: str) -> Signer | None:
    """The signer of service ``name``: ``NEURONS_SERVICE_KEY`` or ``<service keys>/<name>.pem``; None if neither."""
    path = settings.service_key if settings.service_key is not None else settings.service_key_dir / f"{name}.pem"
    if not path.exists():
        return None
    return Signer(f"service:{name}", load_private_key(path))


def require_service_signer(settings, name: str) -> Signer:
    signer = service_signer(settings, name)
    if signer is None:
        raise MissingKey(f"no private key for service {name} at {settings.service_key_dir / (name + '.pem')}: "
                         "run `neurons up` (it makes the embedded platform's keys) or set NEURONS_SERVICE_KEY")
    return signer


def model_signing_key_path(settings) -> Path:
    """The EC P-256 private key the trainer signs adapter folders with."""
    return settings.service_key_dir / f"{MODEL_SIGNER}-model-signing.pem"


def model_signing_public_pem(settings) -> bytes | None:
    """The anchored public key adapter signatures are verified with (PEM), or None."""
    pem = load_anchors(settings.trust_path)["model_signing"].get(MODEL_SIGNER)
    return pem.encode() if pem else None


def operator_key_path(settings, operator_id: str) -> Path:
    return settings.operator_key_dir / f"{operator_id}.pem"


def operator_signer(settings, operator_id: str, key: str | os.PathLike | None = None) -> Signer:
    """The signer of operator ``operator_id``; MissingKey, saying how to make one, when there is no key."""
    path = Path(key) if key is not None else operator_key_path(settings, operator_id)
    if not path.exists():
        raise MissingKey(f"no private key for operator {operator_id} at {path}: an admin runs "
                         f"`neurons operator enroll {operator_id} --role ROLE`, or pass --key FILE")
    return Signer(f"operator:{operator_id}", load_private_key(path))


def new_operator_key(settings, operator_id: str) -> Signer:
    """Make operator ``operator_id``'s key pair (private key PEM, mode 0600); refuses to overwrite one."""
    path = operator_key_path(settings, operator_id)
    if path.exists():
        raise KeyringError(f"operator {operator_id} already has a key at {path}")
    key = Ed25519PrivateKey.generate()
    _write_private(path, _pem(key))
    return Signer(f"operator:{operator_id}", key)


def init_admin(settings, operator_id: str, label: str | None = None) -> Signer:
    """Make the first admin: a key pair, anchored in the trust file. Refused once an admin is anchored."""
    anchors = load_anchors(settings.trust_path)
    if anchors["admins"]:
        raise KeyringError(f"{settings.trust_path} already anchors admin(s) {', '.join(sorted(anchors['admins']))}; "
                           "further operators are enrolled by an admin: `neurons operator enroll`")
    signer = new_operator_key(settings, operator_id)
    anchors["admins"][operator_id] = {"public_key": signer.public_key, "key_id": signer.key_id,
                                      **({"label": label} if label else {})}
    save_anchors(anchors, settings.trust_path)
    return signer
