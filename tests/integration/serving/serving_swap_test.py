"""Swaps under load: two profiles asked without pause while their channels get three promotions and a rollback.

Every request succeeds, and each names an adapter that was legitimately in service for its profile: the one
put there (promoted or rolled back to, as archived) last before the request started, or a later one put there
before it ended. The previous adapter counts too for a request that started before the serving node showed
the new one (it swaps once the new one is loaded). ``neurons audit at`` says the same for sampled requests,
and each swap is a ``serving.adapter_loaded`` event with its latency.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from tests.integration.registry.registry_events import promote
from tests.integration.serving.serving_support import (adapter_loaded, await_serving, client, parse_time)
from tests.support import await_until

EMB, GEN = "emb-profile", "gen-profile"
TEXTS = ["The adapter in service answers.", "Promotions land while requests run."]
QUESTION = [{"role": "user", "content": "What is a good name for a cat?"}]
PHASE_S = 1.0  # requests keep running this long on each adapter once the serving node shows it


@dataclass
class Answer:
    profile: str
    how: str  # embed | chat | stream
    start: datetime
    end: datetime
    header_sha: str | None = None
    body_shas: tuple[str | None, ...] = ()
    error: str | None = None


class Hammer:
    """Threads asking the serving API in a loop until stopped, each answer recorded with its start and end."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.answers: list[Answer] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(how,), daemon=True)
                        for how in ("embed", "embed", "chat", "stream")]

    def __enter__(self) -> "Hammer":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _loop(self, how: str) -> None:
        from shared.contracts.envelope import utcnow

        api = client(self.settings)
        while not self.stop.is_set():
            answer = Answer(EMB if how == "embed" else GEN, how, utcnow(), utcnow())
            try:
                self._ask(api, how, answer)
            except Exception as exc:  # every failure is an answer the test counts
                answer.error = f"{type(exc).__name__}: {exc}"
            answer.end = utcnow()
            self.answers.append(answer)

    @staticmethod
    def _ask(api, how: str, answer: Answer) -> None:
        if how == "embed":
            raw = api.embeddings.with_raw_response.create(model=EMB, input=TEXTS)
            body = raw.parse()
            assert len(body.data) == len(TEXTS)
            answer.body_shas = (body.model_extra["neurons"]["adapter_sha256"],)
        elif how == "chat":
            raw = api.chat.completions.with_raw_response.create(model=GEN, messages=QUESTION, max_tokens=6,
                                                                temperature=0)
            body = raw.parse()
            assert body.choices[0].finish_reason in ("stop", "length")
            answer.body_shas = (body.model_extra["neurons"]["adapter_sha256"],)
        else:
            raw = api.chat.completions.with_raw_response.create(model=GEN, messages=QUESTION, max_tokens=6,
                                                                temperature=0, stream=True)
            chunks = list(raw.parse())
            assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
            answer.body_shas = tuple(c.model_extra["neurons"]["adapter_sha256"] for c in chunks)
        answer.header_sha = raw.headers["x-neurons-adapter-sha256"]


def _put_in_service(plat, channel: str) -> list[tuple[datetime, str, str]]:
    """(when, adapter, event id) of each promotion and rollback on ``channel``, in the archive's order."""
    return [(parse_time(e["occurred_at"]), e["payload"]["adapter_sha256"], e["event_id"])
            for e in plat.archived() if e["type"] in ("adapter.promoted", "adapter.rolled_back")
            and e["payload"]["channel"] == channel]


def _allowed(answer: Answer, steps: list[tuple[datetime, str, str]], shown: list[datetime]) -> list[str]:
    """The adapters that may answer ``answer``: in service at its start (the previous one too until the serving
    node showed the new one), or put in service later, before it ended."""
    at_start = max(k for k, (at, _, _) in enumerate(steps) if at <= answer.start)
    at_end = max(k for k, (at, _, _) in enumerate(steps) if at <= answer.end)
    lowest = at_start if answer.start >= shown[at_start] else at_start - 1
    return [sha for _, sha, _ in steps[max(lowest, 0):at_end + 1]]


def _audit(plat, at: datetime, profile: str) -> str | None:
    from shared.contracts.envelope import iso

    return json.loads(plat.cli("audit", "at", iso(at), "--profile", profile, "--json").stdout)["adapter_sha256"]


def _profile(plat, profile_id: str, channel: str) -> None:
    plat.cli("profiles", "create", profile_id, "--channel", channel, "--trait", "tone=brisk", "--operator", "alice")


async def test_requests_under_promotions_and_a_rollback_succeed_on_adapters_in_service(serving):
    import asyncio

    plat, settings = serving, serving.settings
    emb1, emb2, emb3 = (plat.adapters[k] for k in ("emb-1", "emb-2", "emb-3"))
    gen1, gen2 = plat.adapters["gen-1"], plat.adapters["gen-2"]
    _profile(plat, EMB, "emb")
    _profile(plat, GEN, "gen")
    await promote(plat, emb1, channel="emb", kind="mntp")
    await promote(plat, gen1, channel="gen", kind="rl")
    shown = {EMB: [await await_serving(settings, EMB, emb1)], GEN: [await await_serving(settings, GEN, gen1)]}

    with Hammer(settings) as hammer:
        await asyncio.sleep(PHASE_S)
        for profile, channel, sha, kind in ((EMB, "emb", emb2, "mntp"), (GEN, "gen", gen2, "rl"),
                                            (EMB, "emb", emb3, "mntp")):
            await promote(plat, sha, channel=channel, kind=kind)
            shown[profile].append(await await_serving(settings, profile, sha))
            await asyncio.sleep(PHASE_S)
        plat.cli("adapters", "rollback", "emb", "--to", emb1, "--operator", "dave", "--reason", "serving test")
        shown[EMB].append(await await_serving(settings, EMB, emb1))
        await asyncio.sleep(PHASE_S)

    answers = hammer.answers
    failed = [a for a in answers if a.error]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[0]}"
    assert not any(t.is_alive() for t in hammer.threads)
    steps = {EMB: _put_in_service(plat, "emb"), GEN: _put_in_service(plat, "gen")}
    assert [sha for _, sha, _ in steps[EMB]] == [emb1, emb2, emb3, emb1]
    assert [sha for _, sha, _ in steps[GEN]] == [gen1, gen2]
    # the profiles followed their channels, step by step (what `audit at --profile` replays)
    for profile, channel in ((EMB, "emb"), (GEN, "gen")):
        followed = [e["payload"]["adapter_sha256"] for e in plat.archived("profile.adapter_updated")
                    if e["payload"]["profile_id"] == profile]
        assert followed == [sha for _, sha, _ in steps[profile]]

    for answer in answers:
        assert set(answer.body_shas) == {answer.header_sha}, answer  # a stream keeps its adapter to its end
        allowed = _allowed(answer, steps[answer.profile], shown[answer.profile])
        assert answer.header_sha in allowed, (answer, allowed)
    by_how = {how: [a for a in answers if a.how == how] for how in ("embed", "chat", "stream")}
    assert all(len(found) >= 5 for found in by_how.values()), {how: len(a) for how, a in by_how.items()}
    assert {a.header_sha for a in answers if a.profile == EMB} == {emb1, emb2, emb3}
    assert {a.header_sha for a in answers if a.profile == GEN} == {gen1, gen2}

    # sampled answers from the middle of a phase: the audit names the adapter that answered
    for profile, k in ((EMB, 1), (EMB, 3), (GEN, 1)):
        until = steps[profile][k + 1][0] if k + 1 < len(steps[profile]) else datetime.max.replace(
            tzinfo=shown[profile][k].tzinfo)
        sample = next(a for a in answers if a.profile == profile and shown[profile][k] <= a.start
                      and a.end < until)
        assert sample.header_sha == steps[profile][k][1]
        assert _audit(plat, sample.start, profile) == sample.header_sha

    # every swap was reported by the serving node, with its latency from the event that asked for it
    for profile in (EMB, GEN):
        for at, sha, _ in steps[profile]:
            reports = await await_until(lambda sha=sha, at=at: [
                p for p in adapter_loaded(plat, sha) if parse_time(p["loaded_at"]) >= at - timedelta(milliseconds=1)],
                20, message=f"serving.adapter_loaded for {sha[:12]} after {at}")
            assert all(isinstance(p["latency_s"], (int, float)) and 0 <= p["latency_s"] < 30 for p in reports)
            assert {p["cause"] for p in reports} <= {"adapter.promoted", "adapter.rolled_back",
                                                     "profile.adapter_updated"}
