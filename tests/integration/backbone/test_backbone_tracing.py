"""One trace id crosses two services through the broker."""

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.envelope import NewEvent
from shared.service import Service
from shared.topics import topic_for
from shared.tracing import setup_tracing
from tests.support import dataset_payload, read_topic


async def test_trace_context_travels_in_kafka_headers(platform, kafka_bootstrap):
    await platform.aensure_topics()
    exporter = InMemorySpanExporter()
    settings = platform.settings
    sender = Service("evolution", reads=["dataset"], settings=settings,
                     tracer_provider=setup_tracing("evolution", settings, [exporter]))
    receiver = Service("registry", reads=["dataset"], settings=settings,
                       tracer_provider=setup_tracing("registry", settings, [exporter]))
    seen = []

    @receiver.handles("dataset.registered")
    def record(event, ctx):
        seen.append(event.event_id)
        return []

    with sender.tracer.start_as_current_span("operator request"):
        [sent] = await sender.emit([NewEvent("dataset.registered", "ds-trace", dataset_payload("ds-trace"))])
    [record_] = await read_topic(kafka_bootstrap, topic_for("dataset"), 1)
    await receiver.process(record_.value, record_.key, record_.headers, record_.topic, record_.partition, record_.offset)
    await sender.close()
    await receiver.close()

    assert seen == [sent.event_id]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["operator request"]
    publish = spans["publish dataset.registered"]
    handle = spans["registry handle dataset.registered"]
    assert publish.context.trace_id == root.context.trace_id == handle.context.trace_id
    assert handle.parent.span_id == publish.context.span_id
    assert publish.resource.attributes["service.name"] == "neurons-evolution"
    assert handle.resource.attributes["service.name"] == "neurons-registry"
