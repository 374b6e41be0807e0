"""Paths named by events, kept inside the platform's folder.

Ids that arrive in events become paths under ``settings.var_dir``: a job's
folder (``var/jobs/<job id>``), a soak's marker, a registered dataset
(``file://…/var/datasets/<sha256>.jsonl``), a base-model folder. The schemas
already refuse ids with ``/`` or ``..`` (``schemas/*.json``); these helpers
check again where the path is made, so an event written around the schemas
(or an old one in the archive) still cannot reach outside the folder meant
for it.

- ``contained(base, *parts)``: ``base/parts`` resolved (symlinks followed),
  refused unless it lies below ``base``; absolute parts and ``..`` are
  refused outright.
- ``segment(name)``: one file or folder name, nothing more.
- ``file_uri_path(uri, base)``: the local file a ``file://`` URI names,
  refused unless it lies under ``base``.
- ``model_spec(spec, models_dir, …)``: a base model an event names: a named
  model, the node's configured one, or a folder under ``models_dir``.

Each raises ``UnsafePath`` (a ``ValueError``) with what was refused and why.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Iterable

FILE_URI = "file://"


class UnsafePath(ValueError):
    """A path named by an event that would lie outside the folder meant for it."""


def _check_part(part: str | os.PathLike[str], base: Path) -> str:
    text = os.fspath(part)
    if not isinstance(text, str):
        raise UnsafePath(f"path part {part!r} under {base} is not text")
    if not text:
        raise UnsafePath(f"empty path part under {base}")
    if "\x00" in text:
        raise UnsafePath(f"path part {text!r} under {base} holds a NUL character")
    if text.startswith(("/", "\\")) or Path(text).is_absolute():
        raise UnsafePath(f"absolute path {text!r} refused: it must lie under {base}")
    if ".." in PurePosixPath(text.replace("\\", "/")).parts:
        raise UnsafePath(f"path {text!r} refused: '..' would leave {base}")
    return text


def contained(base: Path, *parts: str | os.PathLike[str]) -> Path:
    """``base`` joined with ``parts`` and resolved; UnsafePath unless it stays under ``base``.

    Symlinks are followed (in ``base`` too), so a link inside ``base`` that
    points outside it is refused as well."""
    root = Path(base).resolve()
    checked = [_check_part(part, root) for part in parts]
    path = root.joinpath(*checked).resolve()
    if checked and path == root:
        raise UnsafePath(f"path {'/'.join(checked)!r} names {root} itself, not something under it")
    if path != root and root not in path.parents:
        raise UnsafePath(f"path {'/'.join(checked)!r} resolves to {path}, outside {root}")
    return path


def segment(name: str) -> str:
    """``name`` when it is one plain file or folder name (no separator, not '.' or '..'); else UnsafePath."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\x00" in name:
        raise UnsafePath(f"{name!r} is not a plain file name")
    return name


def file_uri_path(uri: str, base: Path) -> Path:
    """The local file a ``file://`` URI names, resolved; UnsafePath unless it lies under ``base``."""
    if not isinstance(uri, str) or not uri.startswith(FILE_URI):
        raise UnsafePath(f"{uri!r} is not a file:// URI")
    raw = uri[len(FILE_URI):]
    if not raw.startswith("/"):
        raise UnsafePath(f"{uri!r} does not name an absolute path (expected file:///…)")
    if "\x00" in raw:
        raise UnsafePath(f"{uri!r} holds a NUL character")
    if ".." in PurePosixPath(raw).parts:
        raise UnsafePath(f"{uri!r} refused: '..' is not allowed in a file URI")
    root = Path(base).resolve()
    path = Path(raw).resolve()
    if root not in path.parents:
        raise UnsafePath(f"{uri!r} lies outside {root}")
    return path


def model_spec(spec: str, models_dir: Path, *, named: Iterable[str] = ("tiny", "smollm2"),
               configured: str | None = None) -> str:
    """The base-model spec an event names, as it may be loaded.

    A named model (built into ``models_dir`` by the model library) and the
    node's own configured spec pass as they are; anything else is a folder
    and must lie under ``models_dir`` (a relative one is taken from there):
    its resolved path is returned."""
    named = tuple(named)
    if not isinstance(spec, str) or not spec:
        raise UnsafePath(f"model {spec!r} is not a model name or folder")
    if spec in named or (configured is not None and spec == configured):
        return spec
    if PurePosixPath(spec).is_absolute():
        if ".." in PurePosixPath(spec).parts or "\x00" in spec:
            raise UnsafePath(f"model folder {spec!r} refused: '..' and NUL are not allowed")
        root = Path(models_dir).resolve()
        path = Path(spec).resolve()
        if root not in path.parents:
            raise UnsafePath(f"model folder {spec!r} lies outside {root}; an event may name "
                             f"{', '.join(named)}, the configured model or a folder under {root}")
        return str(path)
    return str(contained(models_dir, spec))
