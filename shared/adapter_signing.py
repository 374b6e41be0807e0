"""Adapter folders signed with OpenSSF model-signing (an EC P-256 key, offline), and checked before use.

The trainer signs every adapter folder as it is stored; whoever loads an
adapter (the validator's replicas, the serving runtime, a warm start) checks
the folder against the anchored public key first. The sha256 of the weights
stays the adapter's name; the signature covers every file of the folder::

    <sha256>/
        adapter_model.safetensors
        adapter_config.json
        training_summary.json
        model.sig                  a Sigstore bundle (DSSE envelope, in-toto statement):
                                   the sha256 of each file above, signed with the trainer's key

``model.sig`` itself is left out of what is hashed (the signed manifest
records it among the ignored paths, so the check leaves it out too). A file
that is missing, modified or not covered by the signature fails the check,
and the error names it. The only files tolerated beside the signed ones are
the artefact store's own transient staging files (``.incoming-*``,
``.download-*``), which a concurrent copy into the same folder leaves for an
instant.

The key pair: ``shared.keys.model_signing_key_path`` (the trainer's private
key) and ``shared.keys.model_signing_public_pem`` (the public key anchored in
the trust file). With no key anchored the check refuses every adapter.
"""

from __future__ import annotations

import ast
import json
import re
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

SIGNATURE_NAME = "model.sig"
# what the artefact store writes into a folder for an instant while it copies a file in (shared.artefacts)
STAGING_PREFIXES = (".incoming-", ".download-")
NO_KEY_ANCHORED = "no adapter-signing key anchored; run neurons up"
_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model-signing accepts


class AdapterSignatureError(ValueError):
    """An adapter folder failed its signature check. ``missing``, ``modified`` and ``extra`` name the files
    concerned (relative to the folder), when the check got that far."""

    def __init__(self, message: str, *, missing: tuple[str, ...] = (), modified: tuple[str, ...] = (),
                 extra: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing, self.modified, self.extra = missing, modified, extra

    @property
    def files(self) -> tuple[str, ...]:
        return self.missing + self.modified + self.extra


def signature_path(folder: Path) -> Path:
    return Path(folder) / SIGNATURE_NAME


def sign_adapter(folder: Path, private_key_pem_path: Path) -> Path:
    """Sign every file of ``folder`` with the EC private key at ``private_key_pem_path``; returns the signature
    file (``<folder>/model.sig``, replaced if there was one)."""
    import model_signing

    folder, key_path = Path(folder), Path(private_key_pem_path)
    if not folder.is_dir():
        raise AdapterSignatureError(f"cannot sign {folder}: not a folder")
    if not key_path.is_file():
        raise AdapterSignatureError(f"no adapter-signing key at {key_path}; run neurons up")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:  # not PEM, or protected by a password
        raise AdapterSignatureError(f"{key_path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in _CURVES:
        raise AdapterSignatureError(f"{key_path} is not an EC P-256, P-384 or P-521 private key; "
                                    "model-signing signs with nothing else")
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=True)
    target = signature_path(folder)
    model_signing.signing.Config().use_elliptic_key_signer(private_key=key_path).set_hashing_config(
        hashing).sign(folder, target)
    return target


def verify_adapter(folder: Path, public_key_pem: bytes | None) -> None:
    """Check ``folder`` against its ``model.sig`` and the public key ``public_key_pem`` (PEM).

    Raises ``AdapterSignatureError`` naming what failed: no key anchored, no
    signature, a signature by another key, or the files missing, modified or
    not covered by the signature."""
    folder = Path(folder)
    if not public_key_pem:
        raise AdapterSignatureError(NO_KEY_ANCHORED)
    if not folder.is_dir():
        raise AdapterSignatureError(f"adapter folder {folder} does not exist")
    signature = signature_path(folder)
    if not signature.is_file():
        raise AdapterSignatureError(f"adapter {folder.name} is not signed: {SIGNATURE_NAME} is missing from {folder}",
                                    missing=(SIGNATURE_NAME,))
    _check_public_key(public_key_pem)
    with tempfile.TemporaryDirectory(prefix="adapter-key-") as scratch:
        key_file = Path(scratch) / "model-signing.pub"
        key_file.write_bytes(public_key_pem)
        try:
            _verify(folder, signature, key_file, ignore_unsigned=False)
        except AdapterSignatureError as exc:
            staging = [name for name in exc.extra if Path(name).name.startswith(STAGING_PREFIXES)]
            if not (exc.extra and len(staging) == len(exc.extra) and not exc.missing and not exc.modified):
                raise
            # only a copy in progress beside the signed files: check the signed files alone
            _verify(folder, signature, key_file, ignore_unsigned=True)


def verify_adapter_with(folder: Path, settings) -> None:
    """``verify_adapter`` with the key anchored in ``settings.trust_path``."""
    from shared.keys import model_signing_public_pem

    verify_adapter(folder, model_signing_public_pem(settings))


def _check_public_key(pem: bytes) -> None:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise AdapterSignatureError(f"the anchored adapter-signing key is not a PEM public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        raise AdapterSignatureError("the anchored adapter-signing key is not an EC P-256, P-384 or P-521 key")


def _verify(folder: Path, signature: Path, key_file: Path, *, ignore_unsigned: bool) -> None:
    import model_signing

    config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=key_file)
    config.set_ignore_unsigned_files(ignore_unsigned)
    try:
        config.verify(folder, signature)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:  # a signature file that is not a bundle
        raise AdapterSignatureError(f"adapter {folder.name}: {SIGNATURE_NAME} is not a model signature "
                                    f"({exc.__class__.__name__}: {exc})", modified=(SIGNATURE_NAME,)) from None
    except ValueError as exc:
        raise _explain(folder, str(exc)) from None
    except Exception as exc:  # cryptography's InvalidSignature carries no message
        raise AdapterSignatureError(f"adapter {folder.name}: {SIGNATURE_NAME} does not verify against the "
                                    f"anchored adapter-signing key ({exc.__class__.__name__})",
                                    modified=(SIGNATURE_NAME,)) from None


_MODIFIED = re.compile(r"^Hash mismatch for '(.+)': Expected ")
_UNREADABLE = re.compile(r"Cannot use '([^']+)'")


def _explain(folder: Path, detail: str) -> AdapterSignatureError:
    """model-signing's ValueError, as a sentence naming the files."""
    prefix = f"adapter {folder.name} failed its signature check"
    if detail.startswith("Signature mismatch: "):
        diffs = _diffs(detail.removeprefix("Signature mismatch: "))
        extra = _listed(diffs, "Extra files found in model ")
        missing = _listed(diffs, "Missing files in model ")
        modified = tuple(m.group(1) for m in map(_MODIFIED.match, diffs) if m)
        parts = [f"{name} was modified" for name in modified]
        parts += [f"{name} is missing" for name in missing]
        parts += [f"{name} is not covered by the signature" for name in extra]
        if parts:
            return AdapterSignatureError(f"{prefix}: {'; '.join(parts)}", missing=missing, modified=modified,
                                         extra=extra)
    if detail.startswith("Key mismatch"):
        return AdapterSignatureError(f"{prefix}: {SIGNATURE_NAME} was made with another key than the anchored "
                                     "adapter-signing key", modified=(SIGNATURE_NAME,))
    unreadable = _UNREADABLE.search(detail)
    if unreadable:  # a symlink, a special file, or a signed file gone (when only signed files are hashed)
        name = _relative(folder, unreadable.group(1))
        return AdapterSignatureError(f"{prefix}: {name} cannot be checked ({detail})", missing=(name,))
    # the rest is about the signature file itself: malformed, or a statement that is not a model manifest
    first_line = detail.strip().splitlines()[0] if detail.strip() else "no detail"
    return AdapterSignatureError(f"{prefix}: {SIGNATURE_NAME} is not a valid signature ({first_line})",
                                 modified=(SIGNATURE_NAME,))


def _diffs(listed: str) -> list[str]:
    """model-signing writes its differences as a Python list of sentences."""
    try:
        diffs = ast.literal_eval(listed)
    except (ValueError, SyntaxError):
        return []
    return [d for d in diffs if isinstance(d, str)] if isinstance(diffs, list) else []


def _listed(diffs: list[str], lead: str) -> tuple[str, ...]:
    """The file names of the sentence ``<lead>'<model>': a, b``."""
    for sentence in diffs:
        if sentence.startswith(lead) and "': " in sentence:
            return tuple(n for n in sentence.split("': ", 1)[1].split(", ") if n)
    return ()


def _relative(folder: Path, path: str) -> str:
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return path
