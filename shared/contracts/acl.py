"""Kafka ACLs derived from the contract: who may write, read and join what.

Topics are per aggregate type, so the ACL of a topic follows from the
``x-producers`` of the event types of that aggregate (``schemas.producers``):

- a principal may WRITE a topic when it may publish at least one type of its
  aggregate; ``service:<name>`` is the Kafka user ``neurons-<name>``, and every
  ``operator:<role>`` is the operators' client, the command line
  (``neurons-cli``): which operator signed is the signature's business, not
  the broker's;
- a service that passes operators' signed commands on unchanged
  (``RELAYS``: the registry's HTTP API relays ``approval.decision_submitted``)
  may WRITE those commands' topics too; the operator's signature, not the
  Kafka user, is what consumers check;
- each service READs the topics it consumes (``SERVICE_READS``, the same list
  as its ``Service(name, reads=...)``, plus the operators' topic every service
  follows) and its own consumer group (``neurons-<name>``), and WRITEs the
  dead-letter topic;
- the command line READs every aggregate topic (it follows a cycle to its end)
  and joins no group;
- the restore tool (``neurons audit republish``, user ``neurons-restore``)
  READs and WRITEs every aggregate topic: it puts the archive back on an empty
  broker, and nothing else holds its credentials;
- every principal may DESCRIBE every platform topic, so the start-up check
  that the topics exist (``shared.topics.ensure_topics``) finds them all.

Nobody gets cluster rights: topics, users and ACLs are the administrator's
(the broker's super user), not any service's. ``render_script`` writes the
ACL set as ``kafka-acls.sh`` commands (``deploy/kafka/acls.sh`` is its output
for the default prefix); ``as_json`` as plain data.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Mapping

from shared.contracts import schemas

DEFAULT_PREFIX = "neurons."
OPERATORS = "cli"  # the operators' client: every operator:<role> producer publishes through it
RESTORE = "restore"  # `neurons audit republish`

# The aggregate types each service consumes: the ``reads`` of its ``Service`` in
# services/<name>/app.py (tests/unit/backbone/test_acl.py keeps the two equal).
# None: every aggregate type (the registry archives the whole log).
SERVICE_READS: Mapping[str, tuple[str, ...] | None] = {
    "trainer": ("training", "dataset", "scaling"),
    "evolution": ("dataset", "cycle", "research", "approval", "training", "validation",
                  "energy", "hardware", "scaling", "adapter"),
    "approval": ("cycle", "research", "validation", "approval"),
    "validator": ("training", "adapter", "dataset", "scaling"),
    "energy": ("training", "validation"),
    "registry": None,
    "serving": ("adapter", "profile"),
}
FOLLOWED_BY_EVERY_SERVICE = ("operator",)  # the enrolments that decide whose signatures count
# Operator-signed event types a service publishes as they are, on the operator's behalf.
RELAYS: Mapping[str, tuple[str, ...]] = {
    "registry": ("approval.decision_submitted",),  # services/registry/api.py: POST .../decisions
}


@dataclass(frozen=True)
class Access:
    """What one Kafka principal may do; topics and groups are full names."""

    user: str  # the SCRAM user name; the principal is ``User:<user>``
    acts_for: tuple[str, ...]  # the contract's producers it stands for: service:<name>, operator:<role>, or a tool
    write: tuple[str, ...]
    read: tuple[str, ...]
    groups: tuple[str, ...]
    describe: tuple[str, ...]  # platform topics it neither reads nor writes but may see

    @property
    def principal(self) -> str:
        return f"User:{self.user}"


def aggregate_types() -> tuple[str, ...]:
    """Every aggregate type the contract names (the part of an event type before the dot)."""
    return tuple(sorted({etype.split(".", 1)[0] for etype in schemas.event_types()}))


def topic(aggregate: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}{aggregate}"


def dlq(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}dlq"


def user(name: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The Kafka user of a service or tool; the same name as a service's consumer group."""
    return f"{prefix.rstrip('.')}-{name}"


def writers() -> dict[str, tuple[str, ...]]:
    """Per aggregate type, who may write its topic: service names (publishers and relays), and OPERATORS
    for any operator role."""
    found: dict[str, set[str]] = {a: set() for a in aggregate_types()}
    producers = schemas.producers()
    for service, relayed in RELAYS.items():
        for etype in relayed:
            if not any(e.startswith("operator:") for e in producers.get(etype, ())):
                raise ValueError(f"{service} relays {etype}, which is no operator's command")
            found[etype.split(".", 1)[0]].add(service)
    for etype, allowed in producers.items():
        aggregate = etype.split(".", 1)[0]
        for entry in allowed:
            kind, _, name = entry.partition(":")
            if kind == "service":
                found[aggregate].add(name)
            elif kind == "operator":
                found[aggregate].add(OPERATORS)
            else:
                raise ValueError(f"{etype}: x-producers entry {entry!r} is neither service:<name> nor operator:<role>")
    return {a: tuple(sorted(names)) for a, names in found.items()}


def service_reads(service: str) -> tuple[str, ...]:
    """The aggregate types whose topics ``service`` consumes, the operators' included."""
    declared = SERVICE_READS[service]
    reads = aggregate_types() if declared is None else (*declared, *FOLLOWED_BY_EVERY_SERVICE)
    return tuple(sorted(set(reads)))


def access(prefix: str = DEFAULT_PREFIX) -> tuple[Access, ...]:
    """The whole ACL set, one entry per principal: the services in SERVICE_READS order, then the tools."""
    aggregates = aggregate_types()
    by_aggregate = writers()
    unknown = {name for names in by_aggregate.values() for name in names} - set(SERVICE_READS) - {OPERATORS}
    if unknown:
        raise ValueError(f"x-producers name services with no entry in SERVICE_READS: {sorted(unknown)}")
    every = tuple(topic(a, prefix) for a in aggregates)
    platform = (*every, dlq(prefix))

    def entry(name: str, acts_for: tuple[str, ...], write: tuple[str, ...], read: tuple[str, ...],
              groups: tuple[str, ...] = ()) -> Access:
        write, read = tuple(sorted(write)), tuple(sorted(read))
        seen = set(write) | set(read)
        return Access(user(name, prefix), acts_for, write, read, groups,
                      tuple(t for t in sorted(platform) if t not in seen))

    entries = []
    for service in SERVICE_READS:
        writes = tuple(topic(a, prefix) for a in aggregates if service in by_aggregate[a])
        entries.append(entry(service, (f"service:{service}",), (*writes, dlq(prefix)),
                             tuple(topic(a, prefix) for a in service_reads(service)), (user(service, prefix),)))
    roles = sorted({e for allowed in schemas.producers().values() for e in allowed if e.startswith("operator:")})
    entries.append(entry(OPERATORS, tuple(roles),
                         tuple(topic(a, prefix) for a in aggregates if OPERATORS in by_aggregate[a]), every))
    entries.append(entry(RESTORE, ("tool:audit-republish",), every, every))
    return tuple(entries)


def as_json(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    return {
        "prefix": prefix,
        "principals": [
            {"principal": a.principal, "user": a.user, "acts_for": list(a.acts_for), "write": list(a.write),
             "read": list(a.read), "groups": list(a.groups), "describe": list(a.describe)}
            for a in access(prefix)
        ],
    }


SCRIPT_HEAD = """\
#!/bin/sh
# The Kafka ACLs of the platform, generated from the contract: who may write a
# topic comes from the x-producers of schemas/*.json, who reads it from the
# topics each service consumes (shared/contracts/acl.py). Do not edit by hand:
#     neurons audit acls --format kafka-acls > deploy/kafka/acls.sh
# tests/unit/backbone/test_acl.py fails when this file and the contract differ.
# Only adds ACLs (running it again changes nothing); withdrawing a grant is
# kafka-acls.sh --remove, see deploy/kafka/README.md. The broker's super user
# runs it (deploy/kafka/init.sh); set KAFKA_ACLS, KAFKA_BOOTSTRAP and
# KAFKA_ADMIN_CONFIG to run it elsewhere.
set -eu
: "${KAFKA_ACLS:=kafka-acls.sh}"
: "${KAFKA_BOOTSTRAP:=kafka:19092}"
: "${KAFKA_ADMIN_CONFIG:=/etc/neurons/kafka/admin.properties}"

acl() {
  "$KAFKA_ACLS" --bootstrap-server "$KAFKA_BOOTSTRAP" --command-config "$KAFKA_ADMIN_CONFIG" --add "$@" >/dev/null
}
"""


def render_script(prefix: str = DEFAULT_PREFIX) -> str:
    """The ACL set as a POSIX shell script of ``kafka-acls.sh --add`` commands, one per operation."""
    lines = [SCRIPT_HEAD.rstrip("\n")]
    for a in access(prefix):
        lines.append(f"\n# {a.user}: {', '.join(a.acts_for)}")
        for operation, kind, names in (("Write", "topic", a.write), ("Read", "topic", a.read),
                                       ("Read", "group", a.groups), ("Describe", "topic", a.describe)):
            if names:
                resources = " ".join(f"--{kind} {shlex.quote(name)}" for name in names)
                lines.append(f"acl --allow-principal {a.principal} --operation {operation} {resources}")
    lines.append('\necho "ACLs applied"')
    return "\n".join(lines) + "\n"
