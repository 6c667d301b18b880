#!/usr/bin/env bash
# A local Ray head with token authentication, for `ray job submit`, `ray status`, `serve run/status/shutdown`
# on this machine (Ray 2.60 turns token auth on by default: clients need RAY_AUTH_MODE=token and the token).
#
#   eval "$(scripts/local_head.sh start)"   # start the head; prints the exports its clients need (eval sets them)
#   scripts/local_head.sh env               # print the exports again (another shell)
#   scripts/local_head.sh stop              # stop this head only (never `ray stop`: it stops every Ray here)
#
# The head runs in the foreground of a background process (`ray start --block`), so stopping it is one signal to
# one pid. Its token is generated once into $MMROLE_HEAD_DIR/auth_token (mode 600); nothing is written to
# ~/.ray. Override ports and the state folder with MMROLE_HEAD_DIR, MMROLE_HEAD_PORT (GCS, 6379),
# MMROLE_DASHBOARD_PORT (Jobs API + dashboard, 8265), MMROLE_AGENT_PORT (dashboard agent, 52365),
# MMROLE_CLIENT_PORT (Ray Client, 10001), MMROLE_HEAD_CPUS (logical CPUs, default max(4, cores)).
set -euo pipefail
cd "$(dirname "$0")/.."
HEAD_DIR="${MMROLE_HEAD_DIR:-/tmp/mmrole-head-$(id -u)}"   # short: Ray's socket paths live under it
GCS_PORT="${MMROLE_HEAD_PORT:-6379}"
DASH_PORT="${MMROLE_DASHBOARD_PORT:-8265}"
AGENT_PORT="${MMROLE_AGENT_PORT:-52365}"     # the dashboard agent (runs the jobs); taken = jobs never start
CLIENT_PORT="${MMROLE_CLIENT_PORT:-10001}"   # Ray Client server
CPUS="${MMROLE_HEAD_CPUS:-$(python3 -c 'import os; print(max(4, os.cpu_count() or 1))')}"
RAY_BIN="$(pwd)/.venv/bin/ray"
[ -x "$RAY_BIN" ] || RAY_BIN="$(command -v ray)"
PIDFILE="$HEAD_DIR/head.pid"
TOKEN="$HEAD_DIR/auth_token"

print_env() {
  echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN"
  echo "export RAY_ADDRESS=127.0.0.1:$GCS_PORT"                      # ray status, drivers (ray.init)
  echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT"   # ray job submit/list/logs/stop
  echo "export RAY_DASHBOARD_ADDRESS=http://127.0.0.1:$DASH_PORT"    # serve status/deploy/shutdown
}

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

start() {
  if running; then
    echo "# a head is already running (pid $(cat "$PIDFILE"), $HEAD_DIR)" >&2
    print_env
    return 0
  fi
  mkdir -p "$HEAD_DIR/ray"
  if [ ! -s "$TOKEN" ]; then
    (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN")
  fi
  # No RAY_ADDRESS & co. from the caller's shell: this head must not try to join another cluster.
  env -u RAY_ADDRESS -u RAY_API_SERVER_ADDRESS -u RAY_DASHBOARD_ADDRESS \
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
    RAY_DASHBOARD_STARTUP_TIMEOUT_S="${RAY_DASHBOARD_STARTUP_TIMEOUT_S:-180}" \
    nohup "$RAY_BIN" start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
      --dashboard-agent-listen-port="$AGENT_PORT" --ray-client-server-port="$CLIENT_PORT" \
      --num-cpus="$CPUS" --temp-dir="$HEAD_DIR/ray" --disable-usage-stats \
      >"$HEAD_DIR/head.log" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  # Ready when the Jobs API accepts a job: it answers (even with our token) before the node's dashboard agent,
  # which runs the jobs, has registered ("No available agent to submit job"). The probe is a no-op job
  # (`mmrole-head-ready-*` in `ray job list`).
  for _ in $(seq 1 240); do
    if ! running; then
      echo "ray start failed; see $HEAD_DIR/head.log:" >&2
      tail -20 "$HEAD_DIR/head.log" >&2
      exit 1
    fi
    if grep -q "Ray runtime started" "$HEAD_DIR/head.log" 2>/dev/null \
      && RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" "$RAY_BIN" job submit --no-wait \
        --address "http://127.0.0.1:$DASH_PORT" --submission-id "mmrole-head-ready-$(date +%s%N)" -- true \
        >/dev/null 2>&1; then
      echo "# local Ray head up (pid $(cat "$PIDFILE"), logs $HEAD_DIR/head.log); stop: scripts/local_head.sh stop" >&2
      print_env
      return 0
    fi
    sleep 1
  done
  echo "the local head did not accept a job in 240 s (a port in use? MMROLE_AGENT_PORT); see $HEAD_DIR/head.log" >&2
  stop
  exit 1
}

stop() {
  if ! running; then
    echo "no local head running ($HEAD_DIR)" >&2
    rm -f "$PIDFILE"
    return 0
  fi
  pid="$(cat "$PIDFILE")"
  kill -TERM "$pid"   # `ray start --block` stops every process of its node on SIGTERM
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  rm -f "$PIDFILE"
  echo "local head stopped" >&2
}

case "${1:-start}" in
  start) start ;;
  env) print_env ;;
  stop) stop ;;
  *) echo "usage: scripts/local_head.sh start|env|stop" >&2; exit 2 ;;
esac
