#!/usr/bin/env bash
# Run medfed the Flower-native way (`flwr run .`) on a local simulation SuperLink.
#
# `flwr run . local` would start its own managed SuperLink, which installs the app's
# dependencies at run time with `uv sync` (downloading a multi-GB CUDA torch). This script starts
# the SuperLink itself with --disable-runtime-dependency-installation, so the run uses the
# project's .venv, then stops it. Extra arguments go to `flwr run`, e.g.
#   deploy/flwr-local-simulation.sh --run-config 'overrides="run.rounds=2"'
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_BIN="${VENV_BIN:-$PWD/.venv/bin}"
export PATH="$VENV_BIN:$PATH"
export FLWR_HOME="${FLWR_HOME:-$PWD/runs/flwr-home}"
SITES="${SITES:-3}"
PORT="${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}"
CONTROL_PORT="${FLWR_LOCAL_CONTROL_API_PORT:-39093}"
mkdir -p "$FLWR_HOME"

# Own process group, so that stopping it also stops the simulation process it spawns.
setsid flower-superlink --insecure --simulation --isolation subprocess \
  --disable-runtime-dependency-installation \
  --control-api-address "127.0.0.1:$CONTROL_PORT" --host 127.0.0.1 --port "$PORT" \
  > "$FLWR_HOME/superlink.log" 2>&1 &
superlink=$!
trap 'kill -- -"$superlink" 2>/dev/null; wait "$superlink" 2>/dev/null || true' EXIT

for _ in $(seq 1 60); do
  if python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$superlink" 2>/dev/null; then
    echo "the SuperLink exited; see $FLWR_HOME/superlink.log" >&2
    exit 1
  fi
  sleep 0.5
done

flwr run . local --stream \
  --federation-config "num-supernodes=$SITES client-resources-num-cpus=1" "$@"
