"""One trace id crosses two services through the broker."""

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.contracts.envelope import NewEvent
from shared.service import Service
from shared.topics import topic_for
from shared.tracing import setup_tracing
from tests.support import dataset_payload, read_topic


async def test_trace_context_travels_in_kafka_headers(platform, kafka_bootstrap):
    await platform.aensure_topics()
    exporter = InMemorySpanExporter()
    settings = platform.settings
    sender = Service("trainer", reads=["training"], settings=settings,
                     tracer_provider=setup_tracing("trainer", settings, [exporter]))
    receiver = Service("registry", reads=["training"], settings=settings,
                       tracer_provider=setup_tracing("registry", settings, [exporter]))
    seen = []

    @receiver.handles("training.progressed")
    def record(event, ctx):
        seen.append(event.event_id)
        return []

    progress = {"job_id": "job-trace", "cycle_id": "cyc-trace", "step": 1, "total_steps": 2, "loss": 2.5,
                "reward_mean": None, "learning_rate": 0.001, "tokens_per_s": 100.0, "energy_j": None}
    with sender.tracer.start_as_current_span("operator request"):
        [sent] = await sender.emit([NewEvent("training.progressed", "job-trace", progress)])
    [record_] = await read_topic(kafka_bootstrap, topic_for("training"), 1)
    await receiver.process(record_.value, record_.key, record_.headers, record_.topic, record_.partition, record_.offset)
    await sender.close()
    await receiver.close()

    assert seen == [sent.event_id]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["operator request"]
    publish = spans["publish training.progressed"]
    handle = spans["registry handle training.progressed"]
    assert publish.context.trace_id == root.context.trace_id == handle.context.trace_id
    assert handle.parent.span_id == publish.context.span_id
    assert publish.resource.attributes["service.name"] == "neurons-trainer"
    assert handle.resource.attributes["service.name"] == "neurons-registry"


async def test_a_batch_publish_has_one_span_per_parent_and_type(platform, kafka_bootstrap):
    from opentelemetry import trace

    from shared.bus import Publisher
    from shared.tracing import extract_context
    from tests.support import make_event, signer_of

    await platform.aensure_topics()
    exporter = InMemorySpanExporter()
    provider = setup_tracing("cli", platform.settings, [exporter])
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("first request") as first:
        first_context = trace.set_span_in_context(first)
    with tracer.start_as_current_span("second request") as second:
        second_context = trace.set_span_in_context(second)
    events = [make_event("dataset.registered", f"ds-batch-{i}", dataset_payload(f"ds-batch-{i}")) for i in range(4)]
    async with Publisher(platform.settings, "cli", tracer_provider=provider,
                         signer=signer_of(platform.settings, events[0].producer.service)) as publisher:
        await publisher.publish_many(events, contexts=[first_context, first_context, first_context, second_context])
    records = await read_topic(kafka_bootstrap, topic_for("dataset"), 4)

    publishes = [s for s in exporter.get_finished_spans() if s.name == "publish dataset.registered"]
    assert len(publishes) == 2
    batch = next(s for s in publishes if s.parent.span_id == first.get_span_context().span_id)
    single = next(s for s in publishes if s.parent.span_id == second.get_span_context().span_id)
    assert batch.attributes["messaging.batch.message_count"] == 3
    assert list(batch.attributes["neurons.event_ids"]) == [e.event_id for e in events[:3]]
    assert single.attributes["neurons.event_id"] == events[3].event_id
    assert "messaging.batch.message_count" not in single.attributes
    # every record names its batch's span as its parent: consumers continue that trace
    parents = {dict(r.headers)["event_id"].decode(): trace.get_current_span(extract_context(r.headers))
               .get_span_context().span_id for r in records}
    assert parents == {**{e.event_id: batch.context.span_id for e in events[:3]},
                       events[3].event_id: single.context.span_id}
