#!/bin/bash
# Runs the healthchecks of running podman containers, each at its own interval, until killed.
#
#   bash docker/podman-healthchecks.sh &
#
# Podman schedules healthchecks with systemd timers; on a host without systemd (a container,
# a CI machine, WSL) it runs none, every container stays "starting", and `docker-compose up`
# waits forever on `condition: service_healthy`. This loop plays the timers' part. Not needed
# with Docker, nor with podman under systemd.
#
#   SWEEPER_HEALTHCHECK_FILTER   a `podman ps --filter` to limit it, e.g. label=com.docker.compose.project=sweeper
set -uo pipefail

declare -A last_run=()
filter=()
if [ -n "${SWEEPER_HEALTHCHECK_FILTER:-}" ]; then
    filter=(--filter "$SWEEPER_HEALTHCHECK_FILTER")
fi

while true; do
    now=$(date +%s)
    # ID and healthcheck interval (seconds, maybe fractional; 0: podman's default of 30 s) of
    # every running container that has a healthcheck.
    while read -r id interval; do
        [ -n "$id" ] || continue
        interval="${interval%%.*}"
        [[ "$interval" =~ ^[0-9]+$ ]] && [ "$interval" -gt 0 ] || interval=30
        if [ $((now - ${last_run[$id]:-0})) -ge "$interval" ]; then
            last_run[$id]=$now
            podman healthcheck run "$id" > /dev/null 2>&1 &
        fi
    done < <(podman ps --quiet "${filter[@]}" 2> /dev/null \
        | xargs -r podman inspect --format '{{if .Config.Healthcheck}}{{.ID}} {{.Config.Healthcheck.Interval.Seconds}}{{end}}' 2> /dev/null)
    wait
    sleep 2
done
