"""The live adapter runtime: one base model in memory, LoRA adapters swapped in while it serves.

``AdapterRuntime`` loads the base model once
(``shared.ml.models.load_model``) and switches adapters with peft
(``load_adapter`` + ``set_adapter``; no merge, so switching back is instant and
exact). An adapter is only ever loaded from bytes whose sha256 was checked
against its name (``shared.artefacts``) and whose folder passed its signature
check against the anchored adapter-signing key (``shared.adapter_signing``): a
node that lacks it fetches it from the shared store first. An adapter that
fails either check is not loaded; what served keeps serving.

``follow`` keeps a runtime on what the log says should serve: on start it
reads the topic from the beginning to find the adapter currently in service,
then swaps on every ``adapter.promoted`` / ``adapter.rolled_back`` of its
channel (or every ``profile.created|updated|adapter_updated`` of its profile),
without a restart.

``python -m shared.adapter_runtime --channel production [--port 8700]`` runs
it as a small serving process (``POST /generate``, ``GET /status``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from shared.adapter_signing import verify_adapter
from shared.contracts.chain import verify_service_decision
from shared.artefacts import ADAPTER_WEIGHTS, ArtefactCorrupted, SharedArtefacts, file_sha256
from shared.contracts.envelope import Envelope
from shared.keys import model_signing_public_pem
from shared.settings import Settings
from shared.trust_view import TrustView

log = logging.getLogger("neurons.adapter_runtime")

# Adapters kept loaded beside the active one: a rollback to a recent one needs no reload.
KEEP_LOADED = 3


@dataclass(frozen=True)
class Target:
    """What should serve: an adapter (sha256 + URI), or None for the base model alone."""

    sha256: str | None
    uri: str | None = None
    cause: str | None = None  # the event type and id that asked for it


def target_of(event: Envelope, *, channel: str | None = None, profile: str | None = None) -> Target | None:
    """The serving target ``event`` sets for the channel or profile followed, if it concerns it."""
    p = event.payload
    cause = f"{event.type} {event.event_id}"
    if channel is not None and event.type in ("adapter.promoted", "adapter.rolled_back") and p.get("channel") == channel:
        return Target(p["adapter_sha256"], p.get("adapter_uri"), cause)
    if profile is not None and p.get("profile_id") == profile:
        if event.type == "profile.adapter_updated":
            return Target(p["adapter_sha256"], p.get("adapter_uri"), cause)
        if event.type in ("profile.created", "profile.updated"):
            return Target(p.get("active_adapter_sha256"), p.get("active_adapter_uri"), cause)
    return None


class ApprovedAdapters:
    """The adapters an operator's signed decision put in service, checked here (``shared.contracts.chain``).

    The registry checked each decision before promoting; the runtime checks
    it again, so an event signed with a stolen service key alone cannot make
    it load an adapter nobody approved.
    """

    CHAIN = ("adapter.promoted", "adapter.rolled_back", "profile.adapter_updated")

    def __init__(self, trust: TrustView) -> None:
        self.trust = trust
        self.approved: set[str] = set()

    def admits(self, event: Envelope, target: Target | None) -> bool:
        """Whether ``event`` may make the runtime serve ``target``; adapters approved on the way are remembered."""
        if event.type in self.CHAIN:
            cause = event.payload.get("cause") if event.type == "profile.adapter_updated" else event.type
            verified = verify_service_decision(event.payload, self.trust.keyring(), cause=cause or "")
            if not verified:
                log.error("refused %s %s: %s: %s", event.type, event.event_id, verified.reason, verified.detail)
                return False
            self.approved.add(event.payload["adapter_sha256"])
            return True
        if target is None or target.sha256 is None:
            return True
        if target.sha256 not in self.approved:  # a profile naming an adapter no verified decision put in service
            log.error("refused %s %s: adapter %s carries no verified decision", event.type, event.event_id, target.sha256)
            return False
        return True


class AdapterRuntime:
    def __init__(self, model: Any, tokenizer: Any, artefacts: SharedArtefacts, info: dict | None = None,
                 signing_key: Callable[[], bytes | None] | None = None) -> None:
        self.base = model
        # the anchored adapter-signing public key (PEM), read at each load; none anchored refuses every adapter
        self.signing_key = signing_key or (lambda: None)
        self.tokenizer = tokenizer
        self.info = info or {}
        self.artefacts = artefacts
        self.model = model  # becomes the PeftModel wrapping ``base`` with the first adapter
        self.active: str | None = None
        self.swaps: list[dict[str, Any]] = []
        self._names: list[str] = []  # loaded adapters, least recently used first
        # A swap and a request never interleave: a request sees one adapter from start to end.
        self._lock = threading.RLock()
        model.eval()

    @classmethod
    def load(cls, settings: Settings, model_spec: str | None = None) -> "AdapterRuntime":
        from shared.ml import load_model

        loaded = load_model(model_spec or settings.model, settings.model_cache_dir)
        return cls(loaded.model, loaded.tokenizer, SharedArtefacts.for_settings(settings), loaded.info,
                   signing_key=lambda: model_signing_public_pem(settings))

    # --- swapping -------------------------------------------------------------

    def activate(self, target: Target) -> bool:
        """Serve ``target``; False when it already serves. Raises when the artefact is missing or corrupt,
        and then the adapter that served keeps serving."""
        if target.sha256 == self.active:
            return False
        started = time.monotonic()
        with self._lock:
            if target.sha256 is None:
                self.active = None
            else:
                name = self._ensure_loaded(target.sha256, target.uri)
                self.model.set_adapter(name)
                self.active = target.sha256
        self.swaps.append({"adapter_sha256": self.active, "cause": target.cause,
                           "seconds": round(time.monotonic() - started, 3)})
        log.info("now serving %s (%s)", self.active or "the base model", target.cause)
        return True

    def _ensure_loaded(self, sha256: str, uri: str | None) -> str:
        name = f"a{sha256[:16]}"
        if name in self._names:
            self._names.remove(name)
            self._names.append(name)
            return name
        folder = self.artefacts.get(uri if uri and uri.startswith("artefact://") else sha256)
        # The store checked the digest; checked again here because these are the bytes that will serve.
        if file_sha256(folder / ADAPTER_WEIGHTS) != sha256:
            raise ArtefactCorrupted(f"adapter {sha256}: {folder / ADAPTER_WEIGHTS} does not hash to its name")
        verify_adapter(folder, self.signing_key())  # AdapterSignatureError names the file that failed
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            if not self._names and not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name)
            else:
                self.model.load_adapter(str(folder), adapter_name=name)
        self.model.eval()
        self._names.append(name)
        while len(self._names) > KEEP_LOADED + 1:
            old = self._names.pop(0)
            if old != name:
                self.model.delete_adapter(old)
        return name

    # --- serving --------------------------------------------------------------

    def _context(self):
        from contextlib import nullcontext

        if self.active is None and self._names:
            return self.model.disable_adapter()  # the base model answers
        return nullcontext()

    def logits(self, prompt: str) -> list[float]:
        """The next-token logits for ``prompt`` under what serves now."""
        import torch

        batch = self.tokenizer(prompt, return_tensors="pt")
        with self._lock, torch.no_grad(), self._context():
            out = self.model(**batch)
        return out.logits[0, -1].float().tolist()

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        import torch

        batch = self.tokenizer(prompt, return_tensors="pt")
        with self._lock, torch.no_grad(), self._context():
            tokens = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(tokens[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def status(self) -> dict[str, Any]:
        return {"adapter_sha256": self.active, "base_model": self.info.get("name"),
                "base_model_sha256": self.info.get("checksum"), "loaded": list(self._names),
                "swaps": self.swaps[-20:]}

    # --- following the log --------------------------------------------------------

    async def follow(self, settings: Settings, *, channel: str | None = None, profile: str | None = None,
                     on_swap: Callable[["AdapterRuntime"], Awaitable[None] | None] | None = None,
                     ready: asyncio.Event | None = None) -> None:
        """Serve what the log says, until cancelled."""
        from aiokafka import AIOKafkaConsumer

        from shared.bus import MalformedEvent, decode
        from shared.log_reader import FETCH_WAIT_MS, partitions_of
        from shared.contracts.signing import Refused
        from shared.topics import ensure_topics, topic_for

        if (channel is None) == (profile is None):
            raise ValueError("follow a channel or a profile")
        await ensure_topics(settings)
        trust = TrustView(settings)
        await trust.catch_up()
        approved = ApprovedAdapters(trust)
        # a profile's adapters are approved on the adapter topic: read both
        topics = [topic_for("adapter")] if channel is not None else [topic_for("adapter"), topic_for("profile")]
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", client_id=f"neurons-runtime-{uuid.uuid4().hex[:6]}",
                                    fetch_max_wait_ms=FETCH_WAIT_MS, **settings.kafka_security())
        await consumer.start()
        try:
            partitions = await partitions_of(consumer, topics)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            behind = {tp for tp, end in ends.items() if end > 0}
            latest: Target | None = None
            caught_up = not behind
            if caught_up:
                await self._settle(None, on_swap, ready)
            while True:
                batch = await consumer.getmany(timeout_ms=500)
                for tp, records in batch.items():
                    for record in records:
                        if record.offset + 1 >= ends.get(tp, 0):
                            behind.discard(tp)
                        try:
                            event = decode(record.value, admit=trust.admit)  # signed, by whom may write it
                        except (MalformedEvent, Refused):
                            continue
                        target = target_of(event, channel=channel, profile=profile)
                        if event.type in ApprovedAdapters.CHAIN:
                            await trust.catch_up()  # an approver enrolled since: one offsets request when none was
                        if approved.admits(event, target) and target is not None:
                            latest = target
                # history read (shared.log_reader: past the reported end, until a fetch brings nothing more):
                # serve its last word, without loading every adapter on the way
                if not caught_up and not behind and not batch:
                    caught_up = True
                    await self._settle(latest, on_swap, ready)
                    latest = None
                elif caught_up and latest is not None:
                    await self._settle(latest, on_swap, None)
                    latest = None
        finally:
            await consumer.stop()
            await trust.close()

    async def _settle(self, target: Target | None, on_swap, ready: asyncio.Event | None) -> None:
        changed = False
        if target is not None:
            try:
                changed = await asyncio.to_thread(self.activate, target)
            except Exception as exc:  # a missing, corrupt or unsigned artefact: keep serving what serves
                log.error("could not switch to %s: %s: %s; %s keeps serving", target.sha256, exc.__class__.__name__,
                          exc, self.active or "the base model")
        first = ready is not None and not ready.is_set()
        if on_swap is not None and (changed or first):
            result = on_swap(self)
            if asyncio.iscoroutine(result):
                await result
        if first:
            ready.set()


# --- the serving process ------------------------------------------------------------------


def _report_writer(path: Path | None, probe: str | None):
    """After each swap, append what serves (and the probe prompt's logits) to a JSON-lines file."""

    def write(runtime: AdapterRuntime) -> None:
        if path is None:
            return
        line = {"adapter_sha256": runtime.active, "at": time.time(), "swaps": len(runtime.swaps)}
        if probe is not None:
            line["logits"] = runtime.logits(probe)
        with path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")

    return write


def _api(runtime: AdapterRuntime):
    from fastapi import Body, FastAPI

    app = FastAPI(title="neurons adapter runtime")

    @app.get("/status")
    def status() -> dict:
        return runtime.status()

    @app.post("/generate")
    def generate(prompt: str = Body(..., embed=True), max_new_tokens: int = Body(32, embed=True)) -> dict:
        return {"adapter_sha256": runtime.active, "text": runtime.generate(prompt, max_new_tokens)}

    return app


async def _serve(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    runtime = await asyncio.to_thread(AdapterRuntime.load, settings, args.model)
    tasks = [asyncio.ensure_future(runtime.follow(
        settings, channel=None if args.profile else args.channel, profile=args.profile,
        on_swap=_report_writer(Path(args.report) if args.report else None, args.probe), ready=asyncio.Event()))]
    if args.port is not None:
        import uvicorn

        server = uvicorn.Server(uvicorn.Config(_api(runtime), host="0.0.0.0", port=args.port, log_level="warning"))
        tasks.append(asyncio.ensure_future(server.serve()))
    await asyncio.gather(*tasks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shared.adapter_runtime",
                                     description="Serve the base model with the adapter the log puts in service.")
    parser.add_argument("--channel", default="production", help="channel to follow (default production)")
    parser.add_argument("--profile", help="follow this personality profile's adapter instead of a channel")
    parser.add_argument("--model", help="base model spec (default NEURONS_MODEL)")
    parser.add_argument("--port", type=int, help="serve POST /generate and GET /status on this port")
    parser.add_argument("--report", help="append a JSON line per swap to this file")
    parser.add_argument("--probe", help="with --report: also record this prompt's next-token logits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
