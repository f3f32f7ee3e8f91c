#!/bin/sh
# How a deploy pipeline hands a promotion to rollbackd (run on the host, after the new
# worker has taken traffic). rollbackd then watches it for the grace period and rolls
# back or flips the kill switch on its own.
#
#   deploy-pipeline.sh NEW_WORKER PREVIOUS_WORKER
#
# Exit status: 0 monitoring started (or recorded for the daemon to pick up), 3 refused
# (e.g. a rollback is in progress), 78 bad configuration.
set -eu
new=$1
previous=$2
config=${ROLLBACKD_CONFIG:-/etc/rollbackd/rollbackd.toml}

# Optional: the error rate and p95 latency before the switch, for the baseline rules.
# baseline="--baseline-error-rate 0.012 --baseline-p95-ms 180"
baseline=""

# shellcheck disable=SC2086
rollbackd --config "$config" promote --active "$new" --previous "$previous" $baseline

# Show where things stand; on-call can follow with `rollbackd audit tail -f`.
rollbackd --config "$config" status
