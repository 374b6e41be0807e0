"""The serving API against bare transformers on the same model and adapter, and how soon a promotion serves.

The registry and the serving node run as processes on a scratch platform
(``bench.scratch``); the serving node loads the runner's model (``tiny`` with
--quick, SmolLM2 otherwise) from the runner's model cache, linked into the
scratch platform's. This process loads the same base model from the same
cache, builds LoRA adapters on it (seeded random weights on ``q_proj`` and
``v_proj``; an ``rl`` one, a causal policy that generates, and an ``mntp`` one,
an encoder that embeds), stores each signed as the trainer does, and
promotes it through the registry with the events it rests on, each signed by
its rightful producer (validation passed with the adapter's kind, promotion
requested, an enrolled approver's grant bound to the adapter, the validation
and the channel). Three figures:

* ``serving.generate``: completion tokens/s of greedy chat completions with a
  fixed ``max_tokens``, asked through the ``openai`` client of ``channel:gen``
  (the rl adapter), against transformers' ``generate`` with the same adapter
  on the same model in this process, on the same prompt (the tokenizer's chat
  template, as the node applies it) and the same end-of-sequence tokens.
  Requests and bare runs take turns (never at once), after one of each not
  counted; each side's tokens over its seconds.
* ``serving.embeddings``: texts/s of ``/v1/embeddings`` requests of a batch of
  texts through the ``openai`` client (``channel:emb``, the mntp adapter),
  against ``shared.ml.embed_texts`` (bidirectional attention, mean pooling:
  what the node runs) with the same adapter on the same model in this
  process, on the same batches, taking turns the same way.
* ``serving.swap``: seconds from the registry's ``adapter.promoted`` (the
  timestamp of its record on the log: when it was published) to the first
  response naming the new adapter, while ``SWAP_CLIENTS`` clients keep asking a
  profile that follows the channel for embeddings; p50 and p99 over repeated
  promotions of fresh adapters, and every request must succeed. Baseline
  (p99): loading the same adapter folders with peft's ``load_adapter`` in this
  process, the bare part of a swap (the node also copies the files and checks
  their digest and signature).

Both sides of a throughput figure use torch's default thread count; a short
untimed pause between turns lets the other process's threads go idle.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import promotion
from bench.events import (THRESHOLDS, make_event, profile_create_requested, promotion_request_id,
                          promotion_requested, signed, signed_envelopes)
from bench.figure import Figure, percentile, ratio
from shared.adapter_signing import sign_adapter
from shared.artefacts import SUMMARY, ArtefactStore
from shared.bus import MalformedEvent, Publisher, decode
from shared.contracts.envelope import Envelope, iso, utcnow
from shared.contracts.trust import decision_subject, sign_decision
from shared.keys import load_private_key, model_signing_key_path
from shared.settings import Settings
from shared.topics import topic_for

NAMES = ("serving.generate", "serving.embeddings", "serving.swap")
TARGET_GENERATE = 0.8
TARGET_EMBEDDINGS = 0.8
TARGET_SWAP_P99_S = 2.0
UNITS = {"serving.generate": "tokens/s", "serving.embeddings": "texts/s", "serving.swap": "s"}
TARGETS = {"serving.generate": f"ratio >= {TARGET_GENERATE}", "serving.embeddings": f"ratio >= {TARGET_EMBEDDINGS}",
           "serving.swap": f"p99 < {TARGET_SWAP_P99_S:.0f} s"}
SERVICES = ("registry", "serving")
OPERATOR = promotion.OPERATOR  # enrolled by ``promotion.prepare``, role approver
GEN, EMB, SWAP = "gen", "emb", "swap"  # the channels
SWAP_PROFILE = "bench-swap"  # follows the swap channel
SWAP_MODEL = SWAP_PROFILE  # what the swap figure's clients ask for: the profile, as applications do
SWAP_CLIENTS = 2
PAUSE_S = (0.3, 1.0)  # before each promotion of the swap figure, drawn at random
TURN_PAUSE_S = 0.2  # untimed, between a request and a bare run
LORA_RANK, LORA_SCALE = 8, 0.05
QUESTION = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper during a storm."}]
WORDS = ("adapter", "signal", "harbour", "lantern", "river", "engine", "garden", "winter", "number", "market",
         "letter", "mountain", "window", "signal", "orbit", "kettle", "meadow", "circuit", "library", "thunder")


def environment(model: str) -> dict[str, str | None]:
    """What the scratch platform's processes read besides the scratch settings: the serving node's model and
    an API on a free loopback port, no token."""
    return {"NEURONS_MODEL": model, "NEURONS_SERVING_PORT": "0", "NEURONS_SERVING_HOST": "127.0.0.1",
            "NEURONS_API_TOKEN": None, "NEURONS_SERVING_MAX_TOKENS": "512"}


class ServingBench:
    """One run: ``prepare`` before the services start (trust, the model in the node's cache), ``measure`` after."""

    def __init__(self, model: str, model_cache: Path) -> None:
        self.model = model
        self.model_cache = Path(model_cache)
        self.loaded: Any = None

    def prepare(self, settings: Settings) -> None:
        from shared.ml import load_model

        promotion.prepare(settings)  # services' and adapter-signing keys, an admin, the approver enrolled
        self.loaded = load_model(self.model, self.model_cache)  # built here once if the cache lacks it
        settings.model_cache_dir.mkdir(parents=True, exist_ok=True)
        (settings.model_cache_dir / self.model).symlink_to((self.model_cache / self.model).resolve())

    def measure(self, settings: Settings, *, requests: int, max_tokens: int, batches: int, texts: int,
                swaps: int, swap_warmup: int) -> list[Figure]:
        import torch

        with tempfile.TemporaryDirectory(prefix="bench-serving-", dir=settings.var_dir) as scratch:
            kinds = [("rl", 1), ("mntp", 2)] + [("mntp", 100 + i) for i in range(swaps + swap_warmup)]
            stored = self._adapters(settings, kinds, Path(scratch))
        (gen, gen_dir), (emb, emb_dir), swap_adapters = stored[0], stored[1], stored[2:]
        url = _wait_for_api(settings)
        asyncio.run(_setup(settings, url, [(gen, "rl", GEN), (emb, "mntp", EMB)]))

        from peft import PeftModel

        bare = PeftModel.from_pretrained(self.loaded.model, str(gen_dir), adapter_name="gen")
        bare.load_adapter(str(emb_dir), adapter_name="emb")
        bare.eval()
        tokenizer = self.loaded.tokenizer
        api = _client(url)
        setting = f"model {self.model}, CPU, {torch.get_num_threads()} torch thread(s) on each side"
        figures = [
            _guard("serving.generate", lambda: _generate(api, bare, tokenizer, requests, max_tokens, setting)),
            _guard("serving.embeddings", lambda: _embeddings(api, bare, tokenizer, batches, texts, setting)),
            _guard("serving.swap", lambda: _swap(settings, url, bare, swap_adapters, swap_warmup, setting)),
        ]
        return figures

    def _adapters(self, settings: Settings, kinds: list[tuple[str, int]], scratch: Path) -> list[tuple[str, Path]]:
        """LoRA adapters of ``kind`` with weights drawn from ``seed``, stored and signed; (sha256, folder) each."""
        import peft
        import torch

        base, out = self.loaded.model, []
        store = ArtefactStore(settings.artefact_dir)
        for kind, seed in kinds:
            config = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["q_proj", "v_proj"],
                                     task_type="CAUSAL_LM")
            lora = peft.get_peft_model(base, config)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, parameter in lora.named_parameters():
                    if "lora_" in name:
                        parameter.copy_(torch.randn(parameter.shape, generator=generator) * LORA_SCALE)
            folder = scratch / f"adapter-{seed}"
            lora.save_pretrained(str(folder))
            (folder / SUMMARY).write_text(json.dumps({"kind": kind}))
            adapter = store.put_adapter(folder, sign=lambda f: sign_adapter(f, model_signing_key_path(settings)))
            base = lora.unload()  # the bare base model again, for the next one
            out.append((adapter.sha256, adapter.path))
        self.loaded.model = base
        return out


def _guard(name: str, measure: Callable[[], Figure]) -> Figure:
    try:
        return measure()
    except Exception as exc:  # one figure failing must not cost the others
        return Figure.failed(name, UNITS[name], TARGETS[name], exc)


# --- the API ---------------------------------------------------------------------------------------------


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="no-token-on-loopback", max_retries=0, timeout=300)


def _wait_for_api(settings: Settings, timeout_s: float = 180.0) -> str:
    """The serving API's URL once it answers (the node has loaded its base model)."""
    import httpx

    path = settings.run_dir / "serving-api.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            url = json.loads(path.read_text())["url"]
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return url
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the serving API did not answer within {timeout_s:.0f}s")


def _served(url: str) -> dict[str, str | None]:
    import httpx

    return {m["id"]: m["neurons"]["adapter_sha256"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]}


async def _until(predicate: Callable[[], Any], timeout_s: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


# --- promotions ------------------------------------------------------------------------------------------


def _rests_on(sha: str, kind: str) -> list[Envelope]:
    """The validator's pass (naming the adapter's kind) and the promotion request, as their services publish them."""
    cycle, validation = f"cyc-{sha[:12]}", f"val-{sha[:16]}"
    passed = make_event("validation.completed", validation, {
        "validation_id": validation, "adapter_sha256": sha, "adapter_uri": f"artefact://sha256/{sha}",
        "baseline": {"kind": "base", "adapter_sha256": None}, "kind": kind, "purpose": "candidate",
        "cycle_id": cycle, "verdict": "pass", "explanation": "bench", "score": 0.75, "raw_data_uri": None,
        "sample_sizes": {"candidate": {"latency_ms": 40}, "baseline": {"latency_ms": 40}},
        "thresholds": THRESHOLDS}, sequence=4, service="validator", correlation_id=cycle)
    return [passed, promotion_requested(sha, cycle)]


def _grant(settings: Settings, sha: str, channel: str) -> Envelope:
    """The approval service's grant carrying the approver's decision, bound to adapter, validation and channel."""
    request_id, validation, cycle, now = promotion_request_id(sha), f"val-{sha[:16]}", f"cyc-{sha[:12]}", utcnow()
    subject = decision_subject("promotion", {"adapter_sha256": sha, "validation_id": validation, "channel": channel})
    decision = sign_decision(request_id, "grant", OPERATOR, load_private_key(settings.operator_key_dir / f"{OPERATOR}.pem"),
                             issued_at=now, expires_at=now + timedelta(minutes=10), extra={"channel": channel},
                             subject=subject)
    return make_event("approval.granted", request_id, {
        "request_id": request_id, "kind": "promotion", "subject_id": validation,
        "subject": {"validation_id": validation, "adapter_sha256": sha}, "cycle_id": cycle,
        "requested_by": "validator", "actor": f"operator:{OPERATOR}", "operator_id": OPERATOR, "policy": None,
        "decision": decision, "granted_at": iso(now)}, sequence=2, service="approval", correlation_id=cycle)


async def _publish(settings: Settings, envelopes: list[Envelope]) -> None:
    async with Publisher(settings, "bench", signer=None) as publisher:
        await publisher.publish_many(envelopes, values=signed(settings, envelopes))


async def _setup(settings: Settings, url: str, promotions: list[tuple[str, str, str]]) -> None:
    """The swap profile created, and each (sha, kind, channel) promoted and served by the node."""
    events = [profile_create_requested(SWAP_PROFILE, SWAP, OPERATOR)]
    for sha, kind, channel in promotions:
        events += [*_rests_on(sha, kind), _grant(settings, sha, channel)]
    await _publish(settings, events)
    for sha, _, channel in promotions:
        await _until(lambda sha=sha, channel=channel: _served(url).get(f"channel:{channel}") == sha, 120,
                     f"the serving node to serve {sha[:12]} on {channel}", interval=0.2)
    await _until(lambda: SWAP_PROFILE in _served(url), 60, f"profile {SWAP_PROFILE}", interval=0.2)


# --- generation -------------------------------------------------------------------------------------------


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id the model's configs and its tokenizer name (the node stops at any of them)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(int(i) for i in ids)


def _turns(rounds: int, sides: dict[str, Callable[[], tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    """(items, seconds) of each side's run, once per round after one untimed warm-up each; the sides take
    turns going first, with an untimed pause between runs."""
    for run in sides.values():
        run()
        time.sleep(TURN_PAUSE_S)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    order = list(sides)
    for index in range(rounds):
        for name in (order if index % 2 == 0 else order[::-1]):
            results[name].append(sides[name]())
            time.sleep(TURN_PAUSE_S)
    return results


def _rate(runs: list[tuple[float, float]]) -> float:
    return sum(items for items, _ in runs) / sum(seconds for _, seconds in runs)


def _generate(api: Any, bare: Any, tokenizer: Any, requests: int, max_tokens: int, setting: str) -> Figure:
    import torch

    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    eos = _eos_ids(bare, tokenizer)
    texts: dict[str, str] = {}

    def served() -> tuple[float, float]:
        started = time.perf_counter()
        answer = api.chat.completions.create(model=f"channel:{GEN}", messages=QUESTION, max_tokens=max_tokens,
                                             temperature=0)
        seconds = time.perf_counter() - started
        texts["served"] = answer.choices[0].message.content
        return answer.usage.completion_tokens, seconds

    def direct() -> tuple[float, float]:
        bare.set_adapter("gen")
        started = time.perf_counter()
        with torch.no_grad():
            out = bare.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                                pad_token_id=eos[0])
        seconds = time.perf_counter() - started
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        if new and new[-1] in eos:
            new = new[:-1]  # the end of sequence is no completion token
        texts["bare"] = tokenizer.decode(new, skip_special_tokens=True)
        return len(new), seconds

    runs = _turns(requests, {"served": served, "bare": direct})
    value, baseline = _rate(runs["served"]), _rate(runs["bare"])
    r = ratio(value, baseline)
    tokens = [int(n) for n, _ in runs["served"]]
    return Figure(
        name="serving.generate", value=value, unit="tokens/s", baseline=baseline, ratio=r,
        target=TARGETS["serving.generate"], passed=r is not None and r >= TARGET_GENERATE, samples=requests,
        notes=(f"greedy chat completions, max_tokens {max_tokens}, through the openai client (HTTP, JSON, the "
               f"node's queue and chat template) on channel:{GEN}, an rl LoRA (r={LORA_RANK}, q_proj/v_proj); "
               f"baseline: transformers generate with the same adapter on the same model in this process, same "
               f"prompt and end-of-sequence ids; {requests} turns each after one warm-up, tokens over seconds; "
               f"{setting}; same text: {'yes' if texts.get('served') == texts.get('bare') else 'no'}"),
        extra={"completion_tokens": tokens, "max_tokens": max_tokens,
               "served_s": [round(s, 4) for _, s in runs["served"]], "bare_s": [round(s, 4) for _, s in runs["bare"]],
               "same_text": texts.get("served") == texts.get("bare")},
    )


# --- embeddings ------------------------------------------------------------------------------------------


def corpus(count: int, seed: int = 7) -> list[str]:
    """``count`` sentences of 12 to 40 words, the same every run."""
    rng = random.Random(seed)
    return [f"Text {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40))) + "."
            for i in range(count)]


def _embeddings(api: Any, bare: Any, tokenizer: Any, batches: int, texts: int, setting: str) -> Figure:
    from shared.ml import embed_texts

    batch = corpus(texts)

    def served() -> tuple[float, float]:
        started = time.perf_counter()
        answer = api.embeddings.create(model=f"channel:{EMB}", input=batch)
        seconds = time.perf_counter() - started
        if len(answer.data) != len(batch):
            raise RuntimeError(f"{len(answer.data)} vectors for {len(batch)} texts")
        return len(batch), seconds

    def direct() -> tuple[float, float]:
        bare.set_adapter("emb")
        started = time.perf_counter()
        vectors, _ = embed_texts(bare, tokenizer, batch, max_length=512, batch_size=16)  # as the node calls it
        return len(vectors), time.perf_counter() - started

    runs = _turns(batches, {"served": served, "bare": direct})
    value, baseline = _rate(runs["served"]), _rate(runs["bare"])
    r = ratio(value, baseline)
    return Figure(
        name="serving.embeddings", value=value, unit="texts/s", baseline=baseline, ratio=r,
        target=TARGETS["serving.embeddings"], passed=r is not None and r >= TARGET_EMBEDDINGS,
        samples=batches * texts,
        notes=(f"/v1/embeddings requests of {texts} texts (12-40 words) through the openai client (base64, as it "
               f"asks) on channel:{EMB}, an mntp LoRA; baseline: shared.ml.embed_texts (bidirectional, mean "
               f"pooling, batches of 16) with the same adapter on the same model in this process; {batches} turns "
               f"each after one warm-up, texts over seconds; {setting}"),
        extra={"texts_per_request": texts, "served_s": [round(s, 4) for _, s in runs["served"]],
               "bare_s": [round(s, 4) for _, s in runs["bare"]]},
    )


# --- swaps -----------------------------------------------------------------------------------------------


class _Clients:
    """Clients asking the swap profile for embeddings without pause; each answer's wall-clock end and adapter."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[float, str | None, str | None]] = []  # (time.time() at the end, adapter, error)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._ask, daemon=True) for _ in range(SWAP_CLIENTS)]

    def _ask(self) -> None:
        api = _client(self.url)
        while not self.stop.is_set():
            try:
                raw = api.embeddings.with_raw_response.create(model=SWAP_MODEL, input=["Which adapter answers?"])
                self.answers.append((time.time(), raw.headers.get("x-neurons-adapter-sha256"), None))
            except Exception as exc:  # counted: a swap must not fail a request
                self.answers.append((time.time(), None, f"{type(exc).__name__}: {exc}"))

    def first(self, sha: str) -> float | None:
        ends = [end for end, served, _ in list(self.answers) if served == sha]
        return min(ends) if ends else None

    def __enter__(self) -> "_Clients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def _swap(settings: Settings, url: str, bare: Any, adapters: list[tuple[str, Path]], warmup: int,
          setting: str) -> Figure:
    samples, reports, answers = asyncio.run(_promote_while_asked(settings, url, adapters))
    failed = [error for _, _, error in answers if error]
    measured = [total for total, _ in samples[warmup:]]
    to_loaded = [part for _, part in samples[warmup:] if part is not None]
    split = ""
    if to_loaded:
        after = [total - part for total, part in samples[warmup:] if part is not None]
        split = (f"; published -> the node's serving.adapter_loaded p50 {percentile(to_loaded, 50):.3f} / p99 "
                 f"{percentile(to_loaded, 99):.3f} s, then -> first response p50 {percentile(after, 50):.3f} / "
                 f"p99 {percentile(after, 99):.3f} s")
    p50, p99 = percentile(measured, 50), percentile(measured, 99)
    loads = _bare_loads(bare, [folder for _, folder in adapters[warmup:]])
    load_p99 = percentile(loads, 99)
    node = {k: [r[k] for r in reports if r.get(k) is not None] for k in ("latency_s", "load_s")}
    node_text = ", ".join(f"{k} p50 {percentile(v, 50):.3f} / p99 {percentile(v, 99):.3f} s"
                          for k, v in node.items() if v)
    return Figure(
        name="serving.swap", value=p99, unit="s", p50=p50, p99=p99, baseline=load_p99,
        target=TARGETS["serving.swap"], passed=p99 < TARGET_SWAP_P99_S and not failed and bool(answers),
        samples=len(measured),
        notes=(f"adapter.promoted published (its record's timestamp) -> first response naming the new adapter, "
               f"{SWAP_CLIENTS} clients asking {SWAP_MODEL} for embeddings meanwhile; {len(measured)} "
               f"promotions of fresh mntp adapters after {warmup} not counted, {PAUSE_S[0]}-{PAUSE_S[1]} s apart "
               f"at random; max {max(measured):.3f} s{split}; {len(answers)} requests, {len(failed)} failed"
               f"{' (' + failed[0] + ')' if failed else ''}; the node's own serving.adapter_loaded: {node_text or '-'}; "
               f"baseline (p99): peft load_adapter of the same folders in this process, p50 "
               f"{percentile(loads, 50):.3f} s; {setting}"),
        extra={"latencies_s": [round(x, 4) for x in measured], "max_s": max(measured), "requests": len(answers),
               "to_loaded_s": [round(x, 4) for x in to_loaded],
               "failed": len(failed), "baseline_p50": percentile(loads, 50),
               "node_latency_s": [round(x, 4) for x in node["latency_s"]],
               "node_load_s": [round(x, 4) for x in node["load_s"]]},
    )


def _bare_loads(bare: Any, folders: list[Path]) -> list[float]:
    """Seconds peft takes to load each adapter folder onto the model in this process (then unloaded)."""
    seconds = []
    for index, folder in enumerate(folders):
        name = f"swap{index}"
        started = time.perf_counter()
        bare.load_adapter(str(folder), adapter_name=name)
        seconds.append(time.perf_counter() - started)
        bare.delete_adapter(name)
    return seconds


def _loaded_at(report: dict) -> float:
    from shared.contracts.values import parse_time

    return parse_time(report["loaded_at"]).timestamp()


async def _promote_while_asked(settings: Settings, url: str, adapters: list[tuple[str, Path]]):
    """Promote each adapter on the swap channel while clients ask; (seconds from the publication to the first
    response and to the node's report of each, the node's reports, the answers)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), group_id=None, enable_auto_commit=False,
                                client_id="neurons-bench-serving", fetch_max_wait_ms=promotion.MEASURE_FETCH_WAIT_MS)
    await consumer.start()
    publisher = Publisher(settings, "bench", signer=None)
    await publisher.start()
    promoted: dict[str, float] = {}  # sha -> the record's timestamp (s since the epoch)
    reports: dict[str, dict] = {}  # sha -> the node's serving.adapter_loaded

    async def read(timeout_ms: int = 50) -> None:
        for records in (await consumer.getmany(timeout_ms=timeout_ms)).values():
            for record in records:
                try:
                    event = decode(record.value)
                except MalformedEvent:
                    continue
                if event.type == "adapter.promoted" and event.payload["channel"] == SWAP:
                    promoted[event.payload["adapter_sha256"]] = record.timestamp / 1000
                elif event.type == "adapter.promotion_refused":
                    raise RuntimeError(f"the registry refused: {event.payload}")
                elif event.type == "serving.adapter_loaded":
                    if not event.payload["loaded"]:
                        raise RuntimeError(f"the serving node did not load: {event.payload}")
                    reports.setdefault(event.payload["adapter_sha256"], event.payload)

    try:
        await consumer._client.force_metadata_update()
        partitions = [TopicPartition(topic_for(a), p) for a in ("adapter", "serving")
                      for p in consumer.partitions_for_topic(topic_for(a)) or ()]
        consumer.assign(partitions)
        for tp, offset in (await consumer.end_offsets(partitions)).items():
            consumer.seek(tp, offset)
        # what each promotion rests on, archived by the registry before any grant
        before = promotion._archived(settings)
        rests_on = [e for sha, _ in adapters for e in _rests_on(sha, "mntp")]
        await publisher.publish_many(rests_on, values=signed(settings, rests_on))
        await _until(lambda: promotion._archived(settings) >= before + len(rests_on), 120,
                     f"the registry to archive {len(rests_on)} events", interval=0.2)
        pauses = random.Random(0)
        latencies = []
        with _Clients(url) as clients:
            await _until(lambda: clients.answers, 60, "a first answer", interval=0.05)
            for sha, _ in adapters:
                grant = signed_envelopes(settings, [_grant(settings, sha, SWAP)])[0]
                await asyncio.sleep(pauses.uniform(*PAUSE_S))
                await publisher.publish(grant)
                deadline = time.monotonic() + 60
                while sha not in promoted or clients.first(sha) is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"adapter {sha[:12]} was not served within 60 s of its grant")
                    await read()
                latencies.append(clients.first(sha) - promoted[sha])
        deadline = time.monotonic() + 10
        while any(sha not in reports for sha, _ in adapters) and time.monotonic() < deadline:
            await read(100)
        samples = [(total, _loaded_at(reports[sha]) - promoted[sha] if sha in reports else None)
                   for total, (sha, _) in zip(latencies, adapters)]
        return samples, [reports[sha] for sha, _ in adapters if sha in reports], list(clients.answers)
    finally:
        await publisher.stop()
        await consumer.stop()
