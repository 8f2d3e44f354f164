#!/bin/bash
# Makes podman the Docker engine of docker-compose on this machine (as root, no systemd):
#
#   bash docker/podman-setup.sh
#   export DOCKER_HOST=unix:///run/podman/podman.sock
#
# 1. /etc/containers/containers.conf (written only when absent): the runc runtime, the
#    cgroupfs cgroup manager (no systemd) and explicit ulimits.
# 2. podman's Docker-compatible API on /run/podman/podman.sock (`podman system service`),
#    started in the background unless it already answers; its log: /var/log/podman-service.log.
# Idempotent. Healthchecks need docker/podman-healthchecks.sh as well where there is no systemd.
set -euo pipefail

SOCKET=/run/podman/podman.sock
CONF=/etc/containers/containers.conf

command -v podman > /dev/null || { echo "podman-setup: podman is not installed (apt-get install podman runc catatonit)" >&2; exit 2; }

if [ ! -e "$CONF" ]; then
    mkdir -p "$(dirname "$CONF")"
    cat > "$CONF" <<'CONF'
# Written by sweeper's docker/podman-setup.sh: podman as root on a host without systemd.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
# podman 4.3 rotates its events file at 1 MB and loses what it held: the compose test reads the
# workers' exit codes from `podman events` after hours of containers.
events_logfile_max_size = "200MB"
cgroup_manager = "cgroupfs"
CONF
    echo "podman-setup: wrote $CONF" >&2
fi

answers() { curl --silent --fail --max-time 5 --unix-socket "$SOCKET" http://d/_ping > /dev/null 2>&1; }

# A service whose working directory was deleted (started from a checkout since removed, as CI's
# are) still answers, but every container it starts fails ("write child: broken pipe": conmon
# cannot get its working directory): stop it and start a fresh one, from / this time.
for pid in $(pgrep -f "podman system service .*$SOCKET" || true); do
    if readlink "/proc/$pid/cwd" 2>/dev/null | grep -q ' (deleted)$'; then
        echo "podman-setup: the API service $pid runs in a deleted folder; restarting it" >&2
        kill "$pid" && sleep 1
    fi
done

if ! answers; then
    mkdir -p "$(dirname "$SOCKET")"
    (cd / && setsid nohup podman system service --time=0 "unix://$SOCKET" >> /var/log/podman-service.log 2>&1 < /dev/null &)
    for _ in $(seq 30); do
        answers && break
        sleep 1
    done
    answers || { echo "podman-setup: $SOCKET does not answer; see /var/log/podman-service.log" >&2; exit 1; }
    echo "podman-setup: podman's API answers on unix://$SOCKET" >&2
fi
