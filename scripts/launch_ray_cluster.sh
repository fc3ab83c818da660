#!/usr/bin/env bash
# Launch, inspect and tear down a Ray cluster that serves OLMo through olmo-serve.
#
#   launch_ray_cluster.sh head   [--node-ip IP] [--port 6380] [--router-port 50051]
#                                [--http-port 8000] [--config cluster.yaml] [--num-cpus N]
#   launch_ray_cluster.sh worker --address HEAD_IP:PORT [--node-ip IP]
#                                [--resources '{"decode": 1}'] [--num-cpus N]
#   launch_ray_cluster.sh status
#   launch_ray_cluster.sh down
#
# Everything binds to 127.0.0.1 unless --node-ip names another address. State (Ray's
# temp dir, the router's pid and log, the cluster secret) lives in $OLMO_RAY_STATE
# (default /tmp/olmo-ray), so `down` stops exactly this cluster's processes and leaves
# any other Ray alone.
# Every command is idempotent: `head` on a running head reports it, `down` on nothing
# says so.
set -euo pipefail

STATE=${OLMO_RAY_STATE:-/tmp/olmo-ray}
RAY_TMP="$STATE/ray"
NODE_IP=127.0.0.1
PORT=6380
ROUTER_PORT=50051
HTTP_PORT=8000
CONFIG=""
NUM_CPUS=""
ADDRESS=""
RESOURCES=""
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# Ray runs worker processes at nice 15 by default; the serving actors must not lose the
# CPU to everything else on the node (a starved worker only looks dead to the router).
export RAY_worker_niceness=${RAY_worker_niceness:-0}

say() { printf '%s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

parse_flags() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --node-ip) NODE_IP=$2; shift 2 ;;
      --port) PORT=$2; shift 2 ;;
      --router-port) ROUTER_PORT=$2; shift 2 ;;
      --http-port) HTTP_PORT=$2; shift 2 ;;
      --config) CONFIG=$2; shift 2 ;;
      --num-cpus) NUM_CPUS=$2; shift 2 ;;
      --address) ADDRESS=$2; shift 2 ;;
      --resources) RESOURCES=$2; shift 2 ;;
      *) die "unknown flag $1 (see the usage at the top of $0)" ;;
    esac
  done
}

router_running() {
  # A killed router nobody has reaped yet is a zombie (state Z): not running.
  [ -f "$STATE/router.pid" ] || return 1
  local state
  state=$(ps -o stat= -p "$(cat "$STATE/router.pid")" 2>/dev/null) || return 1
  [ "${state:0:1}" != Z ]
}

loopback_only() {
  # Ray's local-only switch: a loopback cluster then binds and dials loopback (without
  # it `ray status` dials the host's own IP). A node on a real network must not set it,
  # or `ray start --address` refuses to join.
  case "$1" in 127.*) export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ;; esac
}

ray_start() {
  loopback_only "$NODE_IP"
  local cpus=()
  [ -n "$NUM_CPUS" ] && cpus=(--num-cpus "$NUM_CPUS")
  ray start "$@" --node-ip-address "$NODE_IP" --object-store-memory 200000000 "${cpus[@]}" \
    >"$STATE/ray-start.log" 2>&1 \
    || { cat "$STATE/ray-start.log" >&2; die "ray start failed"; }
}

cmd_head() {
  parse_flags "$@"
  mkdir -p "$STATE"
  if router_running; then
    say "head already running: router pid $(cat "$STATE/router.pid"), Generate API on $(cat "$STATE/router.address")"
    return 0
  fi
  loopback_only "$NODE_IP"
  if [ ! -f "$STATE/ray.address" ] || ! ray status --address "$(cat "$STATE/ray.address")" >/dev/null 2>&1; then
    say "starting Ray head on $NODE_IP:$PORT"
    ray_start --head --port "$PORT" --temp-dir "$RAY_TMP" --include-dashboard=false \
      --ray-client-server-port $((PORT + 1)) --disable-usage-stats
    echo "$NODE_IP:$PORT" >"$STATE/ray.address"
    echo head >"$STATE/role"
  fi
  local config=()
  [ -n "$CONFIG" ] && config=(--config "$CONFIG")
  say "starting the router (log: $STATE/router.log)"
  # The cluster secret (made on first start, mode 0600) authenticates every internal
  # call and the admin API; `status` reads it from the same file.
  nohup olmo-serve serve --ray-address "$(cat "$STATE/ray.address")" --router-host "$NODE_IP" \
    --router-port "$ROUTER_PORT" --router-http-port "$HTTP_PORT" --token-file "$STATE/cluster.token" \
    "${config[@]}" \
    >"$STATE/router.log" 2>&1 &
  echo $! >"$STATE/router.pid"
  for _ in $(seq 1 900); do
    if grep -q "^serving " "$STATE/router.log" 2>/dev/null; then
      echo "$NODE_IP:$ROUTER_PORT" >"$STATE/router.address"
      say "ready: Generate API on $NODE_IP:$ROUTER_PORT (olmo-serve generate --address $NODE_IP:$ROUTER_PORT \"Hello\")"
      say "       OpenAI-compatible API on http://$NODE_IP:$HTTP_PORT/v1, metrics on /metrics"
      say "workers join with: $0 worker --address $(cat "$STATE/ray.address")"
      return 0
    fi
    router_running || { cat "$STATE/router.log" >&2; die "the router exited"; }
    sleep 1
  done
  die "the router did not come up in 15 minutes; see $STATE/router.log"
}

cmd_worker() {
  parse_flags "$@"
  [ -n "$ADDRESS" ] || die "worker needs --address HEAD_IP:PORT"
  mkdir -p "$STATE"
  if [ "$NODE_IP" = 127.0.0.1 ]; then
    die "a worker joins over the network: pass --node-ip with this node's address"
  fi
  if raylet_running; then
    say "worker already running: this node ($NODE_IP) is in the Ray cluster at $(cat "$STATE/ray.address")"
    return 0
  fi
  local resources=()
  [ -n "$RESOURCES" ] && resources=(--resources "$RESOURCES")
  say "joining Ray cluster at $ADDRESS as $NODE_IP"
  # This node's own temp dir (under its state dir), so that `down` finds exactly its
  # processes, also where several nodes share a machine.
  ray_start --address "$ADDRESS" --temp-dir "$RAY_TMP" "${resources[@]}"
  echo "$ADDRESS" >"$STATE/ray.address"
  echo worker >"$STATE/role"
  say "joined; the router places prefill/decode workers here as resources allow"
}

raylet_running() {
  pgrep -f -- "raylet.*$RAY_TMP" >/dev/null 2>&1
}

cmd_status() {
  if [ ! -f "$STATE/ray.address" ]; then say "no cluster started from $STATE"; return 0; fi
  loopback_only "$(cat "$STATE/ray.address")"
  ray status --address "$(cat "$STATE/ray.address")" || say "Ray head at $(cat "$STATE/ray.address") is not answering"
  if router_running; then
    olmo-serve status --router "$(cat "$STATE/router.address" 2>/dev/null || echo "$NODE_IP:$ROUTER_PORT")" \
      --token-file "$STATE/cluster.token"
  elif [ -f "$STATE/router.log" ]; then
    say "router: not running (its log: $STATE/router.log)"
  else
    say "router: on the head node (this is a worker node)"
  fi
}

descendants() {
  local queue="$*" all=""
  while [ -n "$queue" ]; do
    local next=""
    for pid in $queue; do all="$all $pid"; next="$next $(pgrep -P "$pid" || true)"; done
    queue=$(echo $next)
  done
  echo $all
}

wait_gone() {
  # Zombies (state Z) have exited; only their parent can reap them.
  local seconds=$1; shift
  for _ in $(seq 1 $((seconds * 4))); do
    [ "$(ps -o stat= -p "$(echo "$@" | tr ' ' ',')" 2>/dev/null | grep -vc '^Z')" -eq 0 ] && return 0
    sleep 0.25
  done
  return 1
}

cmd_down() {
  local roots=""
  if router_running; then roots="$(cat "$STATE/router.pid")"; fi
  roots="$roots $(pgrep -f -- "$RAY_TMP" | grep -vx $$ || true)"
  # The head's Ray client server names the head's address, not the temp dir. (On a
  # worker node that address is the head's: its processes are the head's to stop.)
  if [ -f "$STATE/ray.address" ] && [ "$(cat "$STATE/role" 2>/dev/null || echo head)" = head ]; then
    roots="$roots $(pgrep -f -- "--address=$(cat "$STATE/ray.address")" | grep -vx $$ || true)"
  fi
  local pids
  pids=$(descendants $roots)
  if [ -z "$pids" ]; then
    say "nothing running from $STATE"
  else
    say "stopping $(echo $pids | wc -w) processes"
    kill -TERM $pids 2>/dev/null || true
    if ! wait_gone 10 $pids; then
      kill -KILL $pids 2>/dev/null || true
      wait_gone 10 $pids || die "processes still running: $pids"
    fi
  fi
  rm -f "$STATE/router.pid" "$STATE/router.address" "$STATE/ray.address" "$STATE/role"
  say "down"
}

case "${1:-}" in
  head) shift; cmd_head "$@" ;;
  worker) shift; cmd_worker "$@" ;;
  status) shift; cmd_status ;;
  down) shift; cmd_down ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
