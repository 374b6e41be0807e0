"""The serving model: one base model in memory, the profiles' LoRA adapters resident beside it.

``AdapterPool`` loads the base model and its tokenizer once and keeps up to
``capacity`` adapters loaded on it with peft (``load_adapter``; never merged,
so switching is exact). An adapter is loaded only from a private copy of its
folder whose weights hash to the adapter's name and whose files pass the
OpenSSF model-signing check against the anchored adapter-signing key
(``shared.adapter_signing``), as ``shared.adapter_runtime`` does; the copy is
what peft reads, so nothing can change the files between the check and the
load. A missing, tampered or unsigned adapter raises ``AdapterUnavailable``
and leaves the pool as it was.

Concurrency. Any number of threads may call the pool. The model runs one
request at a time: a request holds the model lock from its first forward pass
to its last, with its adapter active (``set_adapter``; the base model inside
``disable_adapter()``), so two requests never mix adapters. Requests are
accepted concurrently and wait for the model in turn, whatever profile they
serve (no batching across requests). Loading and evicting adapters also take
the model lock; fetching and checking an adapter's files does not. An adapter
a request is waiting for or running with is pinned: eviction, least recently
used first, skips it, and the pool may then hold more than ``capacity``
adapters until the request ends.

Generation decodes causally with the KV cache, greedily at temperature 0;
``stream`` runs the same decoding on a worker thread and hands the text out
piece by piece, so the model lock is taken and released on one thread and an
abandoned stream (``Stream.close()``, or dropped) stops at its next token.
Embeddings come from ``shared.ml.embed_texts`` with the adapter active.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from shared.adapter_signing import STAGING_PREFIXES, AdapterSignatureError, verify_adapter_with
from shared.artefacts import (ADAPTER_WEIGHTS, SUMMARY, URI_PREFIX, ArtefactCorrupted, ArtefactError,
                              ArtefactNotFound, SharedArtefacts, file_sha256)

log = logging.getLogger("neurons.serving.pool")

KINDS = ("mntp", "rl")
_HEX = re.compile(r"^[0-9a-f]{64}$")


class AdapterUnavailable(Exception):
    """An adapter that cannot serve: not in the store, tampered with, unsigned, or not loadable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length" (max_tokens reached)
    adapter_sha256: str | None  # None: the base model answered
    seconds: float  # from the call to the last token, waiting for the model included
    first_token_s: float  # from the call to the first token chosen (== seconds when none was)
    queued_s: float = 0.0  # of ``seconds``, spent waiting for the model (other requests running)


@dataclass(frozen=True)
class _Request:
    sha: str | None
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    stop: tuple[str, ...]
    seed: int | None
    called: float  # time.monotonic() at the call


@dataclass
class _Resident:
    name: str  # the peft adapter name
    loaded_s: float


class Stream:
    """The text of one generation, piece by piece; ``generation`` is set once the pieces are exhausted.

    Iterating blocks until the next piece is decoded. ``close()`` (or leaving
    a ``with`` block, or dropping the object) stops the decoding at its next
    token. An error during decoding is raised by the iteration."""

    def __init__(self) -> None:
        self.generation: Generation | None = None
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._finished = False

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        if self._finished:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "piece":
            return value
        self._finished = True
        if kind == "error":
            raise value
        self.generation = value
        raise StopIteration

    def close(self) -> None:
        self._cancel.set()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self._cancel.set()


class AdapterPool:
    def __init__(self, model: Any, tokenizer: Any, artefacts: SharedArtefacts, verify: Callable[[Path], None],
                 info: dict | None = None, capacity: int = 4) -> None:
        """``verify(folder)`` raises ``AdapterSignatureError`` for a folder that fails its signature check."""
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.base = model
        self.model = model  # becomes the PeftModel wrapping ``base`` with the first adapter
        self.tokenizer = tokenizer
        self.artefacts = artefacts
        self.verify = verify
        self.info = info or {}
        self.capacity = capacity
        config = getattr(model, "config", None)
        self.context_length: int | None = getattr(config, "max_position_embeddings", None)
        self._eos = _eos_ids(model, tokenizer)
        self._model_lock = threading.Lock()  # the model: one request, load or eviction at a time
        self._load_lock = threading.Lock()  # one adapter fetched and checked at a time
        self._state = threading.Lock()  # the bookkeeping below; always taken last, never held long
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self._in_use: Counter[str] = Counter()
        self._uris: dict[str, str] = {}
        self._kinds: dict[str, str | None] = {}  # of adapters whose folder passed its checks
        self._counts: Counter[str] = Counter()
        self._last_error: str | None = None
        model.eval()

    @classmethod
    def load(cls, settings: Any, model_spec: str | None = None, capacity: int = 4) -> "AdapterPool":
        """The base model named by ``model_spec`` (default ``settings.model``), loaded once, and an empty pool."""
        from shared.ml import load_model

        loaded = load_model(model_spec or settings.model, settings.model_cache_dir)
        return cls(loaded.model, loaded.tokenizer, SharedArtefacts.for_settings(settings),
                   lambda folder: verify_adapter_with(folder, settings), loaded.info, capacity)

    # --- residency -------------------------------------------------------------------------------

    def ensure(self, sha: str | None, uri: str | None = None) -> float:
        """Make adapter ``sha`` resident (None: the base model, always there); the seconds it took, 0.0 when it
        already was. Raises ``AdapterUnavailable`` (the pool unchanged) when it cannot be loaded."""
        if sha is None:
            return 0.0
        if self._touch(sha, uri):
            return 0.0
        started = time.monotonic()
        with self._load_lock:
            if self._touch(sha, uri):  # another caller loaded it meanwhile
                return time.monotonic() - started
            with tempfile.TemporaryDirectory(prefix="neurons-adapter-") as scratch:
                folder, kind = self._checked_copy(sha, uri, Path(scratch))
                with self._model_lock:
                    name = self._attach(sha, folder)
                    seconds = time.monotonic() - started
                    with self._state:
                        self._resident[sha] = _Resident(name, seconds)
                        self._kinds[sha] = kind
                        if uri:
                            self._uris[sha] = uri
                        self._counts["loads"] += 1
                    self._evict_unlocked(keep=sha)
        log.info("adapter %s resident (%s) in %.2fs", sha[:12], kind or "kind unknown", seconds)
        return seconds

    def kind_of(self, sha: str | None) -> str | None:
        """``mntp`` or ``rl`` as the adapter's training summary records it; None for the base model (or a summary
        that names neither). Raises ``AdapterUnavailable`` for an adapter that is not loadable."""
        if sha is None:
            return None
        with self._state:
            if sha in self._kinds:
                return self._kinds[sha]
        with tempfile.TemporaryDirectory(prefix="neurons-adapter-") as scratch:
            _, kind = self._checked_copy(sha, self._uris.get(sha), Path(scratch))
        with self._state:
            self._kinds[sha] = kind
        return kind

    def resident(self) -> list[str]:
        """The resident adapters, least recently used first."""
        with self._state:
            return list(self._resident)

    def status(self) -> dict[str, Any]:
        with self._state:
            return {
                "base_model": self.info.get("name"),
                "base_model_sha256": self.info.get("checksum"),
                "capacity": self.capacity,
                "resident": [{"adapter_sha256": sha, "kind": self._kinds.get(sha), "load_s": round(r.loaded_s, 3)}
                             for sha, r in self._resident.items()],
                "in_use": {sha: n for sha, n in self._in_use.items() if n},
                "busy": self._model_lock.locked(),
                "loads": self._counts["loads"],
                "evictions": self._counts["evictions"],
                "requests": self._counts["requests"],
                "refused": self._counts["refused"],
                "last_error": self._last_error,
            }

    def _touch(self, sha: str, uri: str | None) -> bool:
        with self._state:
            if sha not in self._resident:
                return False
            self._resident.move_to_end(sha)
            if uri:
                self._uris[sha] = uri
            return True

    def _checked_copy(self, sha: str, uri: str | None, scratch: Path) -> tuple[Path, str | None]:
        """A private copy of the adapter's folder, its weights' digest and its signature checked; and its kind."""
        try:
            if not _HEX.match(sha):
                raise AdapterUnavailable(f"{sha!r} is not an adapter sha256")
            if uri and uri.startswith(URI_PREFIX) and uri != URI_PREFIX + sha:
                raise AdapterUnavailable(f"adapter {sha}: its URI {uri} names another artefact")
            try:
                stored = self.artefacts.get(sha)
            except ArtefactNotFound as exc:
                raise AdapterUnavailable(f"adapter {sha} is not in the artefact store: {exc.args[0]}") from None
            except ArtefactCorrupted:
                raise AdapterUnavailable(f"adapter {sha}: {ADAPTER_WEIGHTS} does not hash to its name") from None
            except (ArtefactError, OSError, ValueError) as exc:
                raise AdapterUnavailable(f"adapter {sha} could not be fetched: {exc}") from None
            folder = scratch / sha
            shutil.copytree(stored, folder, symlinks=True,
                            ignore=shutil.ignore_patterns(*(f"{p}*" for p in STAGING_PREFIXES)))
            if not (folder / ADAPTER_WEIGHTS).is_file() or file_sha256(folder / ADAPTER_WEIGHTS) != sha:
                raise AdapterUnavailable(f"adapter {sha}: {ADAPTER_WEIGHTS} does not hash to its name")
            try:
                self.verify(folder)
            except AdapterSignatureError as exc:
                raise AdapterUnavailable(f"adapter {sha}: {exc}") from None
            return folder, _kind(folder)
        except AdapterUnavailable as exc:
            with self._state:
                self._counts["refused"] += 1
                self._last_error = exc.reason
            log.error("adapter %s refused: %s", sha, exc.reason)
            raise

    def _attach(self, sha: str, folder: Path) -> str:
        """Load the checked copy onto the model (the model lock held); its peft adapter name."""
        from peft import PeftModel

        name = f"a{sha}"
        device = str(next(self.base.parameters()).device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            try:
                if not isinstance(self.model, PeftModel):
                    self.model = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name,
                                                           torch_device=device)
                else:
                    self.model.load_adapter(str(folder), adapter_name=name, torch_device=device)
            except Exception as exc:  # a config or weights peft cannot apply to this base model
                if isinstance(self.model, PeftModel) and name in self.model.peft_config:
                    self.model.delete_adapter(name)
                reason = f"adapter {sha} could not be loaded: {exc.__class__.__name__}: {exc}"
                with self._state:
                    self._counts["refused"] += 1
                    self._last_error = reason
                raise AdapterUnavailable(reason) from None
        self.model.eval()
        return name

    def _evict_unlocked(self, keep: str | None = None) -> None:
        """Unload least recently used adapters beyond ``capacity`` that no request holds, ``keep`` (just loaded)
        aside (the model lock held)."""
        while True:
            with self._state:
                if len(self._resident) <= self.capacity:
                    return
                victim = next((sha for sha in self._resident if sha != keep and not self._in_use[sha]), None)
                if victim is None:
                    return  # every other resident adapter is in use: trimmed when a request ends
                name = self._resident.pop(victim).name
                self._counts["evictions"] += 1
            with warnings.catch_warnings():  # peft says which adapter it makes active instead: set per request
                warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
                self.model.delete_adapter(name)
            log.info("adapter %s evicted (capacity %d)", victim[:12], self.capacity)

    def _pin(self, sha: str | None) -> None:
        """Keep ``sha`` resident for a request: loaded if it is not (``AdapterUnavailable`` if it cannot be)."""
        if sha is None:
            return
        with self._state:
            self._in_use[sha] += 1
        try:
            self.ensure(sha, self._uris.get(sha))
        except BaseException:
            self._unpin(sha)
            raise

    def _unpin(self, sha: str | None) -> None:
        if sha is None:
            return
        with self._state:
            self._in_use[sha] -= 1
            if self._in_use[sha] <= 0:
                del self._in_use[sha]
            over = len(self._resident) > self.capacity
        if over and self._model_lock.acquire(blocking=False):  # never wait for another request here
            try:
                self._evict_unlocked()
            finally:
                self._model_lock.release()

    @contextmanager
    def _active(self, sha: str | None) -> Iterator[None]:
        """Adapter ``sha`` (None: no adapter) is what the model computes with (the model lock held)."""
        with self._state:
            names = [r.name for r in self._resident.values()]
            target = self._resident[sha].name if sha is not None else None
        if sha is not None:
            self.model.set_adapter(target, inference_mode=True)
            yield
        elif names:
            self.model.set_adapter(names[0], inference_mode=True)  # disable_adapter reads the active one's config
            with self.model.disable_adapter():
                yield
        else:
            yield  # no adapter was ever loaded: the base model as it is

    # --- requests --------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt for a chat: the tokenizer's chat template with the assistant's turn opened; without one,
        a ``role: content`` line per message and a last line ``assistant:``."""
        plain = [{"role": str(m.get("role", "user")), "content": _content_text(m.get("content"))} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        return "\n".join([f"{m['role']}: {m['content']}" for m in plain] + ["assistant:"])

    def generate(self, sha: str | None, prompt: str, *, max_tokens: int, temperature: float = 0.0,
                 stop: list[str] | None = None, seed: int | None = None) -> Generation:
        """Complete ``prompt`` with adapter ``sha`` active (None: the base model); waits for the model in turn.

        Greedy at temperature 0, else sampled (reproducibly when ``seed`` is
        given). Ends at the end-of-sequence token or the first of ``stop``
        (``finish_reason`` "stop"; the stop string is not part of the text), or
        after ``max_tokens`` tokens ("length"). Raises ``AdapterUnavailable``."""
        request = self._request(sha, prompt, max_tokens, temperature, stop, seed)
        self._pin(sha)
        return self._execute(request, lambda piece: None, lambda: False)

    def stream(self, sha: str | None, prompt: str, *, max_tokens: int, temperature: float = 0.0,
               stop: list[str] | None = None, seed: int | None = None) -> Stream:
        """``generate`` piece by piece. The adapter is made resident before this returns (so
        ``AdapterUnavailable`` is raised here); decoding runs on a worker thread, in turn with other requests."""
        request = self._request(sha, prompt, max_tokens, temperature, stop, seed)
        self._pin(sha)
        stream = Stream()
        pieces, cancel = stream._queue, stream._cancel

        def work() -> None:
            try:
                generation = self._execute(request, lambda piece: pieces.put(("piece", piece)), cancel.is_set)
            except BaseException as exc:  # handed to the reader, raised where it iterates
                pieces.put(("error", exc))
                return
            pieces.put(("done", generation))

        threading.Thread(target=work, name=f"serving-stream-{(sha or 'base')[:8]}", daemon=True).start()
        return stream

    def embed(self, sha: str | None, texts: list[str], *, max_length: int = 512,
              batch_size: int = 16) -> tuple[list[list[float]], int]:
        """``shared.ml.embed_texts`` with adapter ``sha`` active (None: the base model): the vectors and the
        tokens embedded. Raises ``AdapterUnavailable``, or ``ValueError`` for a text with no token."""
        from shared.ml import embed_texts

        self._pin(sha)
        try:
            with self._model_lock, self._active(sha):
                with self._state:
                    self._counts["requests"] += 1
                return embed_texts(self.model, self.tokenizer, texts, max_length=max_length, batch_size=batch_size)
        finally:
            self._unpin(sha)

    def _request(self, sha: str | None, prompt: str, max_tokens: int, temperature: float,
                 stop: list[str] | None, seed: int | None) -> _Request:
        called = time.monotonic()
        if max_tokens < 0 or temperature < 0:
            raise ValueError("max_tokens and temperature must not be negative")
        ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            bos = getattr(self.tokenizer, "bos_token_id", None)
            if bos is None:
                raise ValueError("the prompt has no token")
            ids = [int(bos)]
        return _Request(sha, ids, int(max_tokens), float(temperature), tuple(s for s in (stop or []) if s), seed,
                        called)

    def _execute(self, request: _Request, emit: Callable[[str], None], cancelled: Callable[[], bool]) -> Generation:
        """Decode ``request`` (its adapter pinned by the caller; unpinned here) with the model to itself."""
        try:
            with self._model_lock:
                queued = time.monotonic() - request.called
                with self._state:
                    self._counts["requests"] += 1
                with self._active(request.sha):
                    text, tokens, finish, first = _decode(self.model, self.tokenizer, self._eos, request, emit,
                                                          cancelled)
        finally:
            self._unpin(request.sha)
        seconds = time.monotonic() - request.called
        return Generation(text=text, prompt_tokens=len(request.prompt_ids), completion_tokens=tokens,
                          finish_reason=finish, adapter_sha256=request.sha, seconds=seconds,
                          first_token_s=seconds if first is None else first, queued_s=queued)


# --- decoding --------------------------------------------------------------------------------------


def _decode(model: Any, tokenizer: Any, eos: set[int], request: _Request, emit: Callable[[str], None],
            cancelled: Callable[[], bool]) -> tuple[str, int, str, float | None]:
    """Causal decoding with the KV cache: the text, the tokens produced, the finish reason, the first token's time."""
    import torch

    device = next(model.parameters()).device
    generator = None
    if request.temperature > 0 and request.seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(request.seed))
    text = _TextOut(tokenizer, request.stop, emit)
    produced, finish, first = 0, "length", None
    if request.max_tokens == 0 or cancelled():
        return "", 0, finish, first
    with torch.no_grad():
        out = model(input_ids=torch.tensor([request.prompt_ids], device=device), use_cache=True)
        while not cancelled():
            token = _pick(out.logits[0, -1], request.temperature, generator)
            if first is None:
                first = time.monotonic() - request.called
            if token in eos:
                finish = "stop"
                break
            produced += 1
            if text.add(token):
                finish = "stop"
                break
            if produced >= request.max_tokens:
                break
            out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=out.past_key_values,
                        use_cache=True)
    return text.finish(), produced, finish, first


def _pick(logits: Any, temperature: float, generator: Any) -> int:
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class _TextOut:
    """The completion's text as tokens arrive: emitted in pieces, held back while it may be the start of a stop
    string or ends inside a character; cut before the first stop string."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], emit: Callable[[str], None]) -> None:
        self.tokenizer, self.stop, self.emit = tokenizer, stop, emit
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def add(self, token: int) -> bool:
        """Take one more token; True when a stop string ended the text."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=None)
        if cut is not None:
            self.text = full[:cut]
            self._send(len(self.text))
            return True
        self.text = full
        if not full.endswith("\ufffd"):  # a character split across tokens waits for its next byte
            self._send(len(full) - _held(full, self.stop))
        return False

    def finish(self) -> str:
        self._send(len(self.text))
        return self.text

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.emit(self.text[self.sent:upto])
            self.sent = upto


def _held(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could be the beginning of a stop string."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


# --- helpers -----------------------------------------------------------------------------------------


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return {int(i) for i in ids}


def _kind(folder: Path) -> str | None:
    try:
        kind = json.loads((folder / SUMMARY).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in KINDS else None


def _content_text(content: Any) -> str:
    """A chat message's content as text: a string, or the text parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)
