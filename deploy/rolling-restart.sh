#!/bin/sh
# Restart every replica of a Compose service, one after another, without failing a request:
#   deploy/rolling-restart.sh [SERVICE]        (default reranker-server; run where `docker compose`
#                                               finds the project: the repository, or COMPOSE_FILE)
# Each replica gets `docker restart -t 140` (docs/deployment.md, "Stopping": the drain + 20 s): it
# drains (HAProxy sends new requests elsewhere; those in progress finish), starts again, and the
# next one waits until it is healthy and the load balancer has checked it once more.
set -eu
service="${1:-reranker-server}"
for id in $(docker compose ps -q "$service"); do
    docker restart -t 140 "$id" >/dev/null
    waited=0
    until [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ]; do
        waited=$((waited + 1))
        if [ "$waited" -gt 600 ]; then
            echo "replica $id not healthy after 600 s" >&2
            exit 1
        fi
        sleep 1
    done
    sleep 3  # one HAProxy check interval (inter 2s) and a little: it takes requests again
    echo "restarted $id"
done
