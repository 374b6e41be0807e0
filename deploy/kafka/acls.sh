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

# neurons-trainer: service:trainer
acl --allow-principal User:neurons-trainer --operation Write --topic neurons.dlq --topic neurons.training
acl --allow-principal User:neurons-trainer --operation Read --topic neurons.dataset --topic neurons.operator --topic neurons.scaling --topic neurons.training
acl --allow-principal User:neurons-trainer --operation Read --group neurons-trainer
acl --allow-principal User:neurons-trainer --operation Describe --topic neurons.adapter --topic neurons.approval --topic neurons.cycle --topic neurons.energy --topic neurons.hardware --topic neurons.profile --topic neurons.research --topic neurons.serving --topic neurons.validation

# neurons-evolution: service:evolution
acl --allow-principal User:neurons-evolution --operation Write --topic neurons.cycle --topic neurons.dlq --topic neurons.research --topic neurons.training
acl --allow-principal User:neurons-evolution --operation Read --topic neurons.adapter --topic neurons.approval --topic neurons.cycle --topic neurons.dataset --topic neurons.energy --topic neurons.hardware --topic neurons.operator --topic neurons.research --topic neurons.scaling --topic neurons.training --topic neurons.validation
acl --allow-principal User:neurons-evolution --operation Read --group neurons-evolution
acl --allow-principal User:neurons-evolution --operation Describe --topic neurons.profile --topic neurons.serving

# neurons-approval: service:approval
acl --allow-principal User:neurons-approval --operation Write --topic neurons.approval --topic neurons.dlq
acl --allow-principal User:neurons-approval --operation Read --topic neurons.approval --topic neurons.cycle --topic neurons.operator --topic neurons.research --topic neurons.validation
acl --allow-principal User:neurons-approval --operation Read --group neurons-approval
acl --allow-principal User:neurons-approval --operation Describe --topic neurons.adapter --topic neurons.dataset --topic neurons.energy --topic neurons.hardware --topic neurons.profile --topic neurons.scaling --topic neurons.serving --topic neurons.training

# neurons-validator: service:validator
acl --allow-principal User:neurons-validator --operation Write --topic neurons.dlq --topic neurons.validation
acl --allow-principal User:neurons-validator --operation Read --topic neurons.adapter --topic neurons.dataset --topic neurons.operator --topic neurons.scaling --topic neurons.training
acl --allow-principal User:neurons-validator --operation Read --group neurons-validator
acl --allow-principal User:neurons-validator --operation Describe --topic neurons.approval --topic neurons.cycle --topic neurons.energy --topic neurons.hardware --topic neurons.profile --topic neurons.research --topic neurons.serving

# neurons-energy: service:energy
acl --allow-principal User:neurons-energy --operation Write --topic neurons.dlq --topic neurons.energy --topic neurons.hardware --topic neurons.scaling
acl --allow-principal User:neurons-energy --operation Read --topic neurons.operator --topic neurons.training --topic neurons.validation
acl --allow-principal User:neurons-energy --operation Read --group neurons-energy
acl --allow-principal User:neurons-energy --operation Describe --topic neurons.adapter --topic neurons.approval --topic neurons.cycle --topic neurons.dataset --topic neurons.profile --topic neurons.research --topic neurons.serving

# neurons-registry: service:registry
acl --allow-principal User:neurons-registry --operation Write --topic neurons.adapter --topic neurons.approval --topic neurons.dlq --topic neurons.profile
acl --allow-principal User:neurons-registry --operation Read --topic neurons.adapter --topic neurons.approval --topic neurons.cycle --topic neurons.dataset --topic neurons.energy --topic neurons.hardware --topic neurons.operator --topic neurons.profile --topic neurons.research --topic neurons.scaling --topic neurons.serving --topic neurons.training --topic neurons.validation
acl --allow-principal User:neurons-registry --operation Read --group neurons-registry

# neurons-serving: service:serving
acl --allow-principal User:neurons-serving --operation Write --topic neurons.dlq --topic neurons.serving
acl --allow-principal User:neurons-serving --operation Read --topic neurons.adapter --topic neurons.operator --topic neurons.profile
acl --allow-principal User:neurons-serving --operation Read --group neurons-serving
acl --allow-principal User:neurons-serving --operation Describe --topic neurons.approval --topic neurons.cycle --topic neurons.dataset --topic neurons.energy --topic neurons.hardware --topic neurons.research --topic neurons.scaling --topic neurons.training --topic neurons.validation

# neurons-cli: operator:admin, operator:approver, operator:requester
acl --allow-principal User:neurons-cli --operation Write --topic neurons.adapter --topic neurons.approval --topic neurons.cycle --topic neurons.dataset --topic neurons.operator --topic neurons.profile --topic neurons.research
acl --allow-principal User:neurons-cli --operation Read --topic neurons.adapter --topic neurons.approval --topic neurons.cycle --topic neurons.dataset --topic neurons.energy --topic neurons.hardware --topic neurons.operator --topic neurons.profile --topic neurons.research --topic neurons.scaling --topic neurons.serving --topic neurons.training --topic neurons.validation
acl --allow-principal User:neurons-cli --operation Describe --topic neurons.dlq

# neurons-restore: tool:audit-republish
acl --allow-principal User:neurons-restore --operation Write --topic neurons.adapter --topic neurons.approval --topic neurons.cycle --topic neurons.dataset --topic neurons.energy --topic neurons.hardware --topic neurons.operator --topic neurons.profile --topic neurons.research --topic neurons.scaling --topic neurons.serving --topic neurons.training --topic neurons.validation
acl --allow-principal User:neurons-restore --operation Read --topic neurons.adapter --topic neurons.approval --topic neurons.cycle --topic neurons.dataset --topic neurons.energy --topic neurons.hardware --topic neurons.operator --topic neurons.profile --topic neurons.research --topic neurons.scaling --topic neurons.serving --topic neurons.training --topic neurons.validation
acl --allow-principal User:neurons-restore --operation Describe --topic neurons.dlq

echo "ACLs applied"
