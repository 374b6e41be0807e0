"""What the publisher computes itself must equal what aiokafka, the propagator and json would."""

import json
import uuid
from datetime import datetime, timezone
import math
import random
import struct

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from shared.bus import murmur2, partition_for
from shared.contracts.envelope import _dumps
from shared.tracing import extract_context, inject_headers, span_headers
from tests.support import dataset_payload, make_event


def test_murmur2_and_the_partition_are_aiokafkas():
    rng = random.Random(7)
    keys = [b"", b"a", b"ds-1", b"ds-bench-000123", "grüße-ü".encode(), bytes(range(256))]
    keys += [rng.randbytes(rng.randrange(0, 80)) for _ in range(3000)]
    keys += [f"job-{rng.getrandbits(48):012x}".encode() for _ in range(1000)]
    partitioner = DefaultPartitioner()
    for key in keys:
        assert murmur2(key) == aiokafka_murmur2(key), key
        for count in (1, 2, 3, 7, 12, 64):
            partitions = list(range(count))
            assert partition_for(key, set(partitions)) == partitioner(key, partitions, partitions), (key, count)


def headers_while_current(span) -> list:
    with trace.use_span(span):
        return inject_headers()


def test_span_headers_are_what_the_propagator_injects():
    tracer = TracerProvider().get_tracer("test")
    root = tracer.start_span("root")
    assert span_headers(root) == headers_while_current(root)
    assert span_headers(root)[0][1] == (
        f"00-{root.get_span_context().trace_id:032x}-{root.get_span_context().span_id:016x}-"
        f"{root.get_span_context().trace_flags:02x}").encode()

    # a child of a remote parent that carries a tracestate, and of one that was not sampled
    for traceparent, tracestate in [("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", b"vendor=one,other=2"),
                                    ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", None)]:
        carried = [("traceparent", traceparent.encode())] + ([("tracestate", tracestate)] if tracestate else [])
        child = tracer.start_span("child", context=extract_context(carried))
        assert span_headers(child) == headers_while_current(child)
        assert dict(span_headers(child)).get("tracestate") == tracestate

    # a span that records nothing still names itself
    quiet = TracerProvider(sampler=ParentBased(ALWAYS_OFF)).get_tracer("test").start_span("quiet")
    assert span_headers(quiet) == headers_while_current(quiet)
    assert span_headers(trace.INVALID_SPAN) == headers_while_current(trace.INVALID_SPAN) == []
    state = NonRecordingSpan(SpanContext(1, 2, False, TraceFlags(1), TraceState([("k", "v")])))
    assert span_headers(state) == headers_while_current(state)


def random_json(rng: random.Random, depth: int = 0):
    """Plain JSON values of every kind the two encoders could write differently."""
    pick = rng.randrange(9 if depth < 4 else 6)
    if pick == 0:
        return rng.choice([None, True, False])
    if pick == 1:
        return rng.choice([0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**70), rng.getrandbits(40)])
    if pick == 2:  # model_dump(mode="json") has written NaN and infinities as null already
        value = struct.unpack("<d", rng.randbytes(8))[0]
        return value if math.isfinite(value) else 0.5
    if pick == 3:
        return rng.uniform(-1, 1) * 10.0 ** rng.randint(-12, 20)
    if pick in (4, 5):
        alphabet = ["a", "e", "-", "0", ".", " ", "\x00", "\n", "\x1f", '"', "\\", "/"]
        rare = ["\x7f", "é", "€", "\u2028", "😀", "\ud800"]
        return "".join(rng.choice(alphabet if rng.random() < 0.97 else rare) for _ in range(rng.randrange(8)))
    if pick in (6, 7):
        return {rng.choice(["b", "a", "A", "_", "é", "e-"] if rng.random() < 0.05 else ["b", "a", "A", "_"]) + str(i):
                random_json(rng, depth + 1)
                for i in range(rng.randrange(4))}
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def test_envelope_bytes_are_json_dumps_sorted_and_compact():
    rng = random.Random(11)
    by_orjson = 0
    for _ in range(20000):
        data = {"payload": random_json(rng)}
        expected = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
        assert _dumps(data) == expected, data
        try:
            by_orjson += orjson.dumps(data, option=orjson.OPT_SORT_KEYS) == expected
        except TypeError:
            pass
    assert by_orjson > 5000  # the fast path was exercised, not only the fallback
    event = make_event("dataset.registered", "ds-1", dataset_payload(name="grüße", record_count=2**70))
    assert event.to_json() == json.dumps(event.to_dict(), separators=(",", ":"), sort_keys=True).encode()
    with pytest.raises(TypeError):
        _dumps({1: "a", "b": 2})


@pytest.mark.parametrize("value", [
    float("inf"), float("nan"), (1, 2), datetime(2020, 1, 1, tzinfo=timezone.utc), 2**70, 1e-7, "\u00e9",
    uuid.UUID(int=7), b"ab", {1, 2}, {1: "a"}, None, True, -0.0, [1, {"b": 2, "a": 1}],
])
def test_envelope_json_is_the_model_dumps_json_whatever_the_payload_holds(value):
    event = make_event("dataset.registered", "ds-1", dataset_payload())
    event = event.model_copy(update={"payload": {**event.payload, "extra": value}})
    assert event.to_json() == json.dumps(event.to_dict(), separators=(",", ":"), sort_keys=True).encode()


@pytest.mark.parametrize("raw", [
    b'{"a":1}', b'{"a":NaN,"b":-Infinity}', b'{"a":1e400}', b'{"a":123456789012345678901234567890}',
    b'{"a":18446744073709551615}', b'{"a":-9223372036854775809}', b'{"a":1,"a":2}', b'{"x":-0.0,"y":1.5e-7}',
    '{"\u00e9":"\u00fc"}', '"\ud800"', b'{"a":"\\u0000"}', b'  {"x":[]} ',
])
def test_loads_reads_what_json_reads(raw):
    from shared.contracts.envelope import loads

    assert repr(loads(raw)) == repr(json.loads(raw))


@pytest.mark.parametrize("raw", [b"\xff", b"[1,2", b"", b"{'a': 1}", '\ufeff{"a":1}'])
def test_loads_refuses_what_json_refuses_with_its_message(raw):
    from shared.contracts.envelope import loads

    with pytest.raises(ValueError) as expected:
        json.loads(raw)
    with pytest.raises(type(expected.value)) as got:
        loads(raw)
    assert str(got.value) == str(expected.value)
