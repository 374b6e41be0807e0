#!/bin/sh
# The one-shot set-up of the compose Kafka, run by the kafka-init service as
# the broker's super user (admin, SASL/PLAIN on the internal listener):
#   1. the topics: one per aggregate type the schemas name
#      (schemas/<aggregate>.<event>.v<N>.json) and the dead-letter topic,
#      infinite retention, as shared/topics.py ensure_topics would create them;
#   2. one SCRAM-SHA-512 user per file credentials/<user>.password;
#   3. the ACLs of acls.sh (generated from the contract).
# Each step can run again: a topic is created only when missing, a user's
# credential is set again from its file, ACLs are only added.
set -eu
BIN="${KAFKA_BIN:-/opt/kafka/bin}"
HERE="${CONFIG_DIR:-/etc/neurons/kafka}"
SCHEMAS="${SCHEMA_DIR:-/etc/neurons/schemas}"
export KAFKA_BOOTSTRAP="${KAFKA_BOOTSTRAP:-kafka:19092}"
export KAFKA_ADMIN_CONFIG="${KAFKA_ADMIN_CONFIG:-$HERE/admin.properties}"
export KAFKA_ACLS="$BIN/kafka-acls.sh"
PREFIX="${NEURONS_TOPIC_PREFIX:-neurons.}"  # acls.sh names topics with the prefix it was generated for
PARTITIONS="${NEURONS_TOPIC_PARTITIONS:-3}"
REPLICATION="${NEURONS_TOPIC_REPLICATION:-1}"
# as shared/settings.py: min(2, replication) unless NEURONS_TOPIC_MIN_INSYNC says otherwise
if [ "$REPLICATION" -ge 2 ]; then DEFAULT_MIN_INSYNC=2; else DEFAULT_MIN_INSYNC=1; fi
MIN_INSYNC="${NEURONS_TOPIC_MIN_INSYNC:-$DEFAULT_MIN_INSYNC}"

admin() {
  "$@" --bootstrap-server "$KAFKA_BOOTSTRAP" --command-config "$KAFKA_ADMIN_CONFIG"
}

echo "waiting for the broker at $KAFKA_BOOTSTRAP"
tries=0
until admin "$BIN/kafka-topics.sh" --list >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 90 ]; then
    echo "no broker answered at $KAFKA_BOOTSTRAP" >&2
    exit 1
  fi
  sleep 2
done

aggregates=$(ls "$SCHEMAS" | sed -n 's/^\([a-z_]*\)\.[a-z_]*\.v[0-9]*\.json$/\1/p' | sort -u)
if [ -z "$aggregates" ]; then
  echo "no schemas under $SCHEMAS" >&2
  exit 1
fi
for aggregate in $aggregates dlq; do
  admin "$BIN/kafka-topics.sh" --create --if-not-exists --topic "$PREFIX$aggregate" \
    --partitions "$PARTITIONS" --replication-factor "$REPLICATION" \
    --config retention.ms=-1 --config retention.bytes=-1 --config min.insync.replicas="$MIN_INSYNC"
done

for file in "$HERE"/credentials/*.password; do
  user=$(basename "$file" .password)
  password=$(tr -d '\r\n' < "$file")
  admin "$BIN/kafka-configs.sh" --alter --entity-type users --entity-name "$user" \
    --add-config "SCRAM-SHA-512=[iterations=8192,password=$password]" >/dev/null
  echo "SCRAM user $user"
done

sh "$HERE/acls.sh"
