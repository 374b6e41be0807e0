"""The content-addressed artefact store: adapters and other blobs, named by sha256.

Layout under the store's root (the same keys on every backend)::

    <sha256>/                      an adapter; sha256 of adapter_model.safetensors
        adapter_model.safetensors  written last: its presence marks a complete adapter
        adapter_config.json
        training_summary.json      config, dataset sha256, base model + checksum,
                                   metrics before/after, loss curve, energy,
                                   software versions, status (trained | fallback)
        model.sig                  the trainer's signature over the three files
                                   (OpenSSF model-signing; shared.adapter_signing),
                                   stored before the weights
    blobs/<sha256>/<name>          any other file (raw validation data, reports)

An artefact is named by the URI ``artefact://sha256/<hex>``, which says what
the bytes are, not where they lie; any node holding the same store (or a copy
of it) resolves it. Stored artefacts are immutable: storing equal content again
returns the existing one. Every read through ``get`` re-checks the digest.

Backends provide the four methods of ``Backend``, with writes that appear
atomically: ``LocalBackend`` (a folder) and ``FsspecBackend`` (any fsspec URL,
e.g. ``s3://``, read through a local download cache). ``SharedArtefacts`` puts
a node's local store in front of a shared one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from shared.paths import UnsafePath, contained

URI_PREFIX = "artefact://sha256/"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SUMMARY = "training_summary.json"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, SUMMARY)
ADAPTER_SIGNATURE = "model.sig"  # shared.adapter_signing.SIGNATURE_NAME
BLOBS = "blobs"
_HEX = re.compile(r"^[0-9a-f]{64}$")


class ArtefactError(Exception):
    pass


class ArtefactNotFound(ArtefactError, KeyError):
    pass


class ArtefactCorrupted(ArtefactError):
    """The stored bytes no longer hash to their name."""


@dataclass(frozen=True)
class StoredArtefact:
    sha256: str
    uri: str
    path: Path


class Backend(Protocol):
    """Where the bytes live. Keys are '/'-separated paths relative to the store root."""

    def exists(self, key: str) -> bool: ...

    def put_file(self, key: str, source: Path) -> None:
        """Copy ``source`` to ``key``; readers never see a partly written object."""
        ...

    def local_path(self, key: str) -> Path:
        """A local file with the object's bytes (remote backends download into a cache)."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Names directly under ``prefix``."""
        ...


class LocalBackend:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        contained(self.root, key)  # UnsafePath (a ValueError) for a key that would leave the store
        return self.root / key

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put_file(self, key: str, source: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=".incoming-", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(source, staging)
            os.chmod(staging, 0o644)
            os.replace(staging, target)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)

    def local_path(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ArtefactNotFound(key)
        return path

    def list(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def uri_for(sha256: str) -> str:
    return URI_PREFIX + _check_hex(sha256)


def sha256_from_uri(uri: str) -> str:
    if not uri.startswith(URI_PREFIX):
        raise ValueError(f"not an artefact URI: {uri!r} (expected {URI_PREFIX}<hex>)")
    return _check_hex(uri[len(URI_PREFIX) :])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ArtefactStore:
    def __init__(self, root: Path, backend: Backend | None = None) -> None:
        self.root = Path(root)
        self.backend: Backend = backend or LocalBackend(self.root)

    # --- adapters ------------------------------------------------------------

    def put_adapter(self, src_dir: Path, summary_updates: dict[str, Any] | None = None,
                    sign: Callable[[Path], Path] | None = None) -> StoredArtefact:
        """Store an adapter folder; ``summary_updates`` (e.g. the measured energy) are merged into its summary.

        ``sign`` signs a folder holding the files exactly as they are stored
        and returns the signature file it wrote there (``ADAPTER_SIGNATURE``);
        the signature is stored before the weights, so an adapter is complete
        only once signed. An adapter stored before without a signature gets one."""
        src_dir = Path(src_dir)
        missing = [name for name in ADAPTER_FILES if not (src_dir / name).is_file()]
        if missing and missing != [SUMMARY]:
            raise ArtefactError(f"{src_dir} is not an adapter folder: missing {', '.join(missing)}")
        sha256 = file_sha256(src_dir / ADAPTER_WEIGHTS)
        if self.backend.exists(f"{sha256}/{ADAPTER_WEIGHTS}"):
            if sign is not None and not self.backend.exists(f"{sha256}/{ADAPTER_SIGNATURE}"):
                self._sign_stored(sha256, sign)
            return StoredArtefact(sha256, uri_for(sha256), self.get(sha256))

        summary = json.loads((src_dir / SUMMARY).read_text()) if (src_dir / SUMMARY).is_file() else {}
        summary.update(summary_updates or {})
        summary["adapter_sha256"] = sha256
        with tempfile.TemporaryDirectory(prefix="artefact-") as scratch:
            folder = Path(scratch) / sha256  # the adapter as it will be stored
            folder.mkdir()
            (folder / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
            shutil.copyfile(src_dir / ADAPTER_CONFIG, folder / ADAPTER_CONFIG)
            shutil.copyfile(src_dir / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
            if file_sha256(folder / ADAPTER_WEIGHTS) != sha256:
                raise ArtefactError(f"{src_dir / ADAPTER_WEIGHTS} changed while it was being stored")
            signature = sign(folder) if sign is not None else None
            self.backend.put_file(f"{sha256}/{SUMMARY}", folder / SUMMARY)
            self.backend.put_file(f"{sha256}/{ADAPTER_CONFIG}", folder / ADAPTER_CONFIG)
            if signature is not None:
                self.backend.put_file(f"{sha256}/{ADAPTER_SIGNATURE}", signature)
            self.backend.put_file(f"{sha256}/{ADAPTER_WEIGHTS}", folder / ADAPTER_WEIGHTS)
        return StoredArtefact(sha256, uri_for(sha256), self.get(sha256))

    def _sign_stored(self, sha256: str, sign: Callable[[Path], Path]) -> None:
        """Sign an adapter already stored (unsigned) from a copy of its files, the weights checked first."""
        with tempfile.TemporaryDirectory(prefix="artefact-") as scratch:
            folder = Path(scratch) / sha256
            folder.mkdir()
            for name in ADAPTER_FILES:
                if self.backend.exists(f"{sha256}/{name}"):
                    shutil.copyfile(self.backend.local_path(f"{sha256}/{name}"), folder / name)
            if file_sha256(folder / ADAPTER_WEIGHTS) != sha256:
                raise ArtefactCorrupted(f"artefact {sha256}: stored bytes hash to something else")
            self.backend.put_file(f"{sha256}/{ADAPTER_SIGNATURE}", sign(folder))

    def summary(self, sha256: str) -> dict[str, Any]:
        return json.loads(self.backend.local_path(f"{_check_hex(sha256)}/{SUMMARY}").read_text())

    # --- other files ---------------------------------------------------------

    def put_file(self, source: Path | bytes, name: str) -> tuple[str, str]:
        """Store a file (or bytes) under its sha256; returns (sha256, uri)."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"invalid blob name {name!r}")
        with tempfile.TemporaryDirectory(prefix="artefact-") as scratch:
            if isinstance(source, (bytes, bytearray)):
                path = Path(scratch) / name
                path.write_bytes(bytes(source))
            else:
                path = Path(source)
            sha256 = file_sha256(path)
            if not self.backend.list(f"{BLOBS}/{sha256}"):
                self.backend.put_file(f"{BLOBS}/{sha256}/{name}", path)
        return sha256, uri_for(sha256)

    # --- reading -------------------------------------------------------------

    def get(self, sha256_or_uri: str) -> Path:
        """The adapter folder, or the blob file, after checking its digest."""
        sha256 = self._sha(sha256_or_uri)
        key = self._primary_key(sha256)
        path = self.backend.local_path(key)
        if file_sha256(path) != sha256:
            raise ArtefactCorrupted(f"artefact {sha256}: stored bytes hash to something else")
        return path.parent if key.endswith(ADAPTER_WEIGHTS) else path

    def verify(self, sha256_or_uri: str) -> bool:
        """True when the artefact is stored and its bytes still hash to its name."""
        try:
            self.get(sha256_or_uri)
        except (ArtefactNotFound, ArtefactCorrupted):
            return False
        return True

    def exists(self, sha256_or_uri: str) -> bool:
        try:
            self._primary_key(self._sha(sha256_or_uri))
        except ArtefactNotFound:
            return False
        return True

    def _primary_key(self, sha256: str) -> str:
        if self.backend.exists(f"{sha256}/{ADAPTER_WEIGHTS}"):
            return f"{sha256}/{ADAPTER_WEIGHTS}"
        names = self.backend.list(f"{BLOBS}/{sha256}")
        if names:
            return f"{BLOBS}/{sha256}/{names[0]}"
        raise ArtefactNotFound(f"artefact {sha256} is not in the store at {self.root}")

    @staticmethod
    def _sha(sha256_or_uri: str) -> str:
        if sha256_or_uri.startswith(URI_PREFIX):
            return sha256_from_uri(sha256_or_uri)
        return _check_hex(sha256_or_uri)


def _check_hex(value: str) -> str:
    if not _HEX.match(value):
        raise ValueError(f"not a sha256 hex digest: {value!r}")
    return value


# --- sharing between nodes -------------------------------------------------------------------


class FsspecBackend:
    """A store root on any fsspec filesystem: ``s3://bucket/prefix`` (with s3fs), ``file://``,
    ``memory://``. Reads are downloaded once into ``cache_dir``: keys are content-addressed,
    so a cached copy never goes stale (and ``ArtefactStore.get`` re-checks its digest anyway)."""

    def __init__(self, url: str, cache_dir: Path, **storage_options: Any) -> None:
        import fsspec

        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.cache_dir = Path(cache_dir)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        # One object PUT is atomic on object stores; a folder needs write-then-rename.
        self._stage = protocol in ("file", "local")

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise UnsafePath(f"artefact key {key!r} would leave the store at {self.url}")
        return f"{self.root}/{key}" if self.root else key

    def exists(self, key: str) -> bool:
        return self.fs.isfile(self._path(key))

    def put_file(self, key: str, source: Path) -> None:
        target = self._path(key)
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self._stage:
            self.fs.put_file(str(source), target)
            return
        staging = f"{parent}/.incoming-{os.getpid()}-{os.urandom(4).hex()}"
        self.fs.put_file(str(source), staging)
        try:
            self.fs.mv(staging, target)
        finally:
            if self.fs.exists(staging):
                self.fs.rm(staging)

    def local_path(self, key: str) -> Path:
        contained(self.cache_dir, key)  # UnsafePath for a key that would leave the cache
        cached = self.cache_dir / key
        if cached.is_file():
            return cached
        if not self.exists(key):
            raise ArtefactNotFound(f"{key} is not in {self.url}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=".download-", dir=cached.parent)
        os.close(fd)
        try:
            self.fs.get_file(self._path(key), staging)
            os.replace(staging, cached)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
        return cached

    def list(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        if not self.fs.isdir(path):
            return []
        names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(path, detail=False))
        return sorted(n for n in names if not n.startswith("."))


def remote_store(url: str, cache_dir: Path) -> ArtefactStore:
    """The shared store at ``url`` (an fsspec URL), read through a local download cache."""
    return ArtefactStore(Path(cache_dir), FsspecBackend(url, cache_dir))


class SharedArtefacts:
    """A node's own store in front of the shared one.

    ``get`` answers from the node's store; what the node lacks it fetches from
    the shared store by sha256, checks, and keeps. ``share`` pushes a local
    artefact to the shared store, so another node can warm-start from it.
    """

    def __init__(self, local: ArtefactStore, remote: ArtefactStore | None = None) -> None:
        self.local = local
        self.remote = remote

    @classmethod
    def for_settings(cls, settings) -> "SharedArtefacts":
        local = ArtefactStore(settings.artefact_dir)
        remote = None
        if settings.artefact_remote:
            remote = remote_store(settings.artefact_remote, settings.var_dir / "cache" / "artefacts")
        return cls(local, remote)

    def get(self, sha256_or_uri: str) -> Path:
        sha256 = ArtefactStore._sha(sha256_or_uri)
        if self.local.exists(sha256):
            if self.remote is not None:  # an adapter fetched before it was signed: its signature now
                _copy_signature(self.remote, self.local, sha256)
            return self.local.get(sha256)  # raises ArtefactCorrupted rather than fetch over bad bytes
        if self.remote is None:
            raise ArtefactNotFound(f"artefact {sha256} is not on this node and no shared store is configured "
                                   "(NEURONS_ARTEFACT_REMOTE)")
        _copy(self.remote, self.local, sha256)
        return self.local.get(sha256)

    def share(self, sha256_or_uri: str) -> str:
        """Put a local artefact in the shared store; returns its URI."""
        sha256 = ArtefactStore._sha(sha256_or_uri)
        if self.remote is None:
            raise ArtefactError("no shared store is configured (NEURONS_ARTEFACT_REMOTE)")
        if not self.remote.exists(sha256):
            _copy(self.local, self.remote, sha256)
        else:
            _copy_signature(self.local, self.remote, sha256)
        return uri_for(sha256)


def _copy(source: ArtefactStore, target: ArtefactStore, sha256: str) -> None:
    """Copy one artefact between stores, checked on the way out and again where it lands."""
    key = source._primary_key(sha256)
    path = source.backend.local_path(key)
    if file_sha256(path) != sha256:
        raise ArtefactCorrupted(f"artefact {sha256} at {source.root}: stored bytes hash to something else")
    if key.endswith(ADAPTER_WEIGHTS):
        # the weights last: their presence is what marks the adapter complete
        for name in (SUMMARY, ADAPTER_CONFIG, ADAPTER_SIGNATURE):
            if source.backend.exists(f"{sha256}/{name}"):
                target.backend.put_file(f"{sha256}/{name}", source.backend.local_path(f"{sha256}/{name}"))
    target.backend.put_file(key, path)
    if not target.verify(sha256):
        raise ArtefactCorrupted(f"artefact {sha256}: the copy at {target.root} does not hash to its name")


def _copy_signature(source: ArtefactStore, target: ArtefactStore, sha256: str) -> None:
    """Give an adapter the target holds unsigned the signature the source has for it."""
    key = f"{sha256}/{ADAPTER_SIGNATURE}"
    if target.backend.exists(key) or not target.backend.exists(f"{sha256}/{ADAPTER_WEIGHTS}"):
        return
    if source.backend.exists(key):
        target.backend.put_file(key, source.backend.local_path(key))
