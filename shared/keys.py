"""Key files: the operator keyring on disk and operators' private keys (the rules are ``shared.contracts.trust``)."""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Iterable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.contracts.trust import Keyring, KeyringError, public_key_b64


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
