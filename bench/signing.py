"""Microseconds per event of signing envelopes and of checking their signatures, against bare Ed25519.

The events are the bus figure's (dataset.registered), published by an
enrolled operator (``operator:bench``, role requester, a fresh Ed25519 key)
so that a consumer's whole check passes. Three figures, each the median of
its rounds (within a round the measured side and its baseline take turns
going first), each against the bare Ed25519 operation it replaces:

* ``signing.sign``: ``shared.bus.signed_values`` over events already
  serialised, in Merkle batches of ``MAX_BATCH`` (64): leaf and node hashes,
  one Ed25519 signature per batch, and each event's block and inclusion proof
  written into its bytes. Baseline: one bare ``Ed25519PrivateKey.sign`` of
  one event's canonical bytes, what signing every event on its own would cost.
* ``signing.verify``: ``shared.trust_view.check_envelope`` of every event of
  a batch whose root is in a warm ``RootCache`` (a consumer past a batch's
  first event): its canonical bytes, the proof up to the root, the key, the
  producer. Baseline: one bare ``Ed25519PublicKey.verify`` of one event's own
  signature over its canonical bytes, with the public key already loaded.
* ``signing.verify_cold``: ``check_envelope`` of the first event of a batch,
  with an empty cache: the same as above plus the root's signature verified.
  Same baseline.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.events import dataset_registered
from bench.figure import Figure, ratio
from shared.bus import signed_values
from shared.contracts.envelope import Envelope
from shared.contracts.signing import MAX_BATCH, KeyRecord, RootCache, Signer, TrustState
from shared.trust_view import check_envelope

NAMES = ("signing.sign", "signing.verify", "signing.verify_cold")
UNIT = "us per event"
PRINCIPAL = "operator:bench"
COLD_REPEATS = 16  # cold checks of each batch's first event per round, each with an empty cache
# Lower is better: the Merkle batch must cost each event well under a signature of its own.
TARGET_SIGN = 0.5  # signed_values per event / one bare sign
TARGET_VERIFY = 0.5  # a warm check per event / one bare verify
TARGET_VERIFY_COLD = 1.5  # a batch's first check / one bare verify: the proof and lookups cost under half a verify
TARGETS = {"signing.sign": f"ratio < {TARGET_SIGN}", "signing.verify": f"ratio < {TARGET_VERIFY}",
           "signing.verify_cold": f"ratio < {TARGET_VERIFY_COLD}"}


def _events(count: int, signer: Signer) -> list[Envelope]:
    """``count`` dataset.registered events whose producer is the signer, as unsigned envelopes."""
    out = []
    for index in range(count):
        envelope = dataset_registered(index)
        out.append(envelope.model_copy(update={"producer": envelope.producer.model_copy(
            update={"service": signer.principal})}))
    return out


Side = tuple[int, Callable[[], object], Callable[[], object] | None]  # items, the timed run, its untimed set-up


def _rounds(rounds: int, sides: dict[str, Side]) -> dict[str, list[float]]:
    """Microseconds per item of each side's run, once per round; the sides take turns going first."""
    costs: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for index in range(rounds):
        for name in order[index % len(order):] + order[:index % len(order)]:
            items, run, prepare = sides[name]
            if prepare is not None:
                prepare()
            started = time.perf_counter()
            run()
            costs[name].append((time.perf_counter() - started) / items * 1e6)
    return costs


def _figure(name: str, costs: Sequence[float], baseline_costs: Sequence[float], target: float, samples: int,
            notes: str) -> Figure:
    value, baseline = statistics.median(costs), statistics.median(baseline_costs)
    r = ratio(value, baseline)
    return Figure(name=name, value=value, unit=UNIT, baseline=baseline, ratio=r, target=TARGETS[name],
                  passed=r is not None and r < target, samples=samples, notes=notes,
                  extra={"rounds_us": [round(x, 2) for x in costs],
                         "baseline_rounds_us": [round(x, 2) for x in baseline_costs]})


def measure(batches: int = 50, rounds: int = 5) -> list[Figure]:
    key = Ed25519PrivateKey.generate()
    signer = Signer(PRINCIPAL, key)
    trust = TrustState()
    trust.add(KeyRecord(signer.key_id, signer.principal, signer.public_key, ("requester",), anchor=True))
    envelopes = _events(batches * MAX_BATCH, signer)
    canonical = [e.to_json() for e in envelopes]
    signed = [Envelope.from_json(value) for value in signed_values(signer, envelopes, canonical)]
    check_envelope(signed[0], trust)  # the events pass the consumer's check, else nothing here means anything
    return [_sign(signer, envelopes, canonical, rounds),
            *_verify(key, trust, signed, canonical, rounds)]


def _sign(signer: Signer, envelopes: list[Envelope], canonical: list[bytes], rounds: int) -> Figure:
    events = len(envelopes)
    costs = _rounds(rounds, {"merkle": (events, lambda: signed_values(signer, envelopes, canonical), None),
                             "bare": (events, lambda: [signer.private_key.sign(data) for data in canonical], None)})
    return _figure(
        "signing.sign", costs["merkle"], costs["bare"], TARGET_SIGN, events * rounds,
        f"shared.bus.signed_values over {events} serialised dataset.registered events ({len(canonical[0])} bytes) "
        f"in Merkle batches of {MAX_BATCH} (SHA-256 tree, one Ed25519 signature per batch, block and proof "
        f"written into each value), {rounds} rounds, median; baseline: one bare Ed25519PrivateKey.sign of each "
        "event's canonical bytes")


def _verify(key: Ed25519PrivateKey, trust: TrustState, signed: list[Envelope], canonical: list[bytes],
            rounds: int) -> list[Figure]:
    events, firsts = len(signed), signed[::MAX_BATCH]
    colds = firsts * COLD_REPEATS  # a run long enough to be timed as steadily as the others
    public = key.public_key()
    own = [(key.sign(data), data) for data in canonical]  # each event signed on its own, for the baseline
    warm, caches = RootCache(), [RootCache() for _ in colds]
    for envelope in firsts:
        check_envelope(envelope, trust, cache=warm)
    costs = _rounds(rounds, {
        "bare": (events, lambda: [public.verify(sig, data) for sig, data in own], None),
        "warm": (events, lambda: [check_envelope(e, trust, cache=warm) for e in signed], None),
        "cold": (len(colds), lambda: [check_envelope(e, trust, cache=c) for e, c in zip(colds, caches)],
                 lambda: caches.__setitem__(slice(None), [RootCache() for _ in colds])),
    })
    bare, warm_costs, cold_costs = costs["bare"], costs["warm"], costs["cold"]
    warm_us, cold_us = statistics.median(warm_costs), statistics.median(cold_costs)
    per_event_of_batch = (cold_us + (MAX_BATCH - 1) * warm_us) / MAX_BATCH
    setting = (f"{len(firsts)} batches of {MAX_BATCH} signed dataset.registered events, decoded, one enrolled "
               f"operator key, {rounds} rounds, median; baseline: one bare Ed25519PublicKey.verify of each "
               f"event's own signature over its canonical bytes (key loaded); a whole batch costs "
               f"{per_event_of_batch:.1f} us per event (first cold, the rest warm)")
    figures = [
        _figure("signing.verify", warm_costs, bare, TARGET_VERIFY, events * rounds,
                "shared.trust_view.check_envelope of every event, its root in a warm RootCache (canonical bytes, "
                "proof up to the root, key, producer; no Ed25519); " + setting),
        _figure("signing.verify_cold", cold_costs, bare, TARGET_VERIFY_COLD, len(colds) * rounds,
                "shared.trust_view.check_envelope of each batch's first event with an empty RootCache (the same "
                f"plus the root's Ed25519 signature verified), {COLD_REPEATS} times each per round; " + setting),
    ]
    for figure in figures:
        figure.extra["batch_us_per_event"] = round(per_event_of_batch, 2)
    return figures
