#!/usr/bin/env bash
# One hospital's site: a Flower 1.42 SuperNode that runs medfed's ClientApp on this site's data.
#
#   deploy/site.sh --site-name NAME --data DIR --state DIR --superlink HOST:PORT \
#                  --ca ca.crt --key NAME.key [--privacy-budget EPS] [--allowed-tasks LIST] \
#                  [--port 9094] [--allow-training-without-privacy] [--require-approval]
#                  [--no-site-worker] [--site-worker-idle-minutes 30] [-- FLAGS...]
#
# Every option can also come from the environment (systemd EnvironmentFile, docker compose):
#   SITE_NAME, DATA_PATH, STATE_DIR, SUPERLINK, CA_CERT, AUTH_KEY, PRIVACY_BUDGET, ALLOWED_TASKS,
#   CLIENTAPP_PORT, ALLOW_TRAINING_WITHOUT_PRIVACY (true/false), REQUIRE_APPROVAL (true/false),
#   SITE_WORKER (true/false), SITE_WORKER_IDLE_MINUTES, VENV_BIN.
#
# What it runs (in the foreground, exec: stop it with SIGTERM / Ctrl-C / systemctl stop):
#   flower-supernode --superlink HOST:PORT --root-certificates ca.crt \
#     --auth-supernode-private-key NAME.key --node-config STATE_DIR/node-config.toml \
#     --isolation subprocess --host 127.0.0.1 --port 9094
# - Only an OUTBOUND HTTPS connection to the SuperLink. The port 9094 is the SuperNode's local
#   runtime API for its own ClientApp processes and is bound to 127.0.0.1 only.
# - The ClientApp runs in subprocesses from this installation's virtualenv (VENV_BIN); SuperNodes
#   never install dependencies at run time unless --allow-runtime-dependency-installation is
#   given (it is not).
# - node config (written to STATE_DIR/node-config.toml, read by medfed.site.resolve_site):
#     site-name, data-path, state-dir, privacy-budget (only if set: otherwise the run's
#     privacy.budget applies), allowed-tasks (comma-separated, only if ALLOWED_TASKS is set; for
#     the task allow-list), allow-training-without-privacy = true (only with that flag),
#     require-approval = true (only with that flag: train only the run configs approved with
#     `medfed site approve CONFIG --by NAME --state-dir STATE_DIR`), site-worker = false (only with
#     --no-site-worker: every message in its own ClientApp process, as Flower starts them),
#     site-worker-idle-minutes (only if set; default 30). The site worker (medfed.site_worker)
#     is one long-lived process per site that answers the ClientApp's messages with torch and the
#     site's data kept loaded; it listens on STATE_DIR/worker/site.sock (0600) and exits when idle
#     or when this SuperNode stops.
# - FLWR_HOME (apps the SuperNode received), uv cache and temp files live under STATE_DIR. The
#   privacy ledger (privacy.json) lives in STATE_DIR too: back it up, never delete it.
# - --insecure: no TLS and no key. Only for a throw-away test against `superlink.sh --insecure`.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
VENV_BIN="${VENV_BIN:-$repo/.venv/bin}"
export PATH="$VENV_BIN:$PATH"   # the SuperNode starts `flower-superexec` / `flwr-clientapp` by name
# Flower phones home by default (usage telemetry, PyPI update check): off unless asked for.
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
# The SuperNode's flower-superexec looks for a message to start a ClientApp for every 1 s by
# default (Flower's setting): 0.2 s starts each message's ClientApp sooner, for a few local requests.
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "site.sh: $*" >&2; exit 2; }

site_name="${SITE_NAME:-}"
data_path="${DATA_PATH:-}"
state_dir="${STATE_DIR:-}"
superlink="${SUPERLINK:-}"
ca_cert="${CA_CERT:-}"
auth_key="${AUTH_KEY:-}"
privacy_budget="${PRIVACY_BUDGET:-}"
# Task allow-list: comma-separated task names this site agrees to train (e.g. "classification").
# Passed as node_config key `allowed-tasks`; enforced by the ClientApp once it supports it.
ALLOWED_TASKS="${ALLOWED_TASKS:-}"
runtime_port="${CLIENTAPP_PORT:-9094}"
allow_no_dp="${ALLOW_TRAINING_WITHOUT_PRIVACY:-false}"
require_approval="${REQUIRE_APPROVAL:-false}"
site_worker="${SITE_WORKER:-true}"
worker_idle="${SITE_WORKER_IDLE_MINUTES:-}"
insecure=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --site-name) [ $# -ge 2 ] || die "--site-name needs a value"; site_name="$2"; shift 2 ;;
    --data) [ $# -ge 2 ] || die "--data needs a folder"; data_path="$2"; shift 2 ;;
    --state) [ $# -ge 2 ] || die "--state needs a folder"; state_dir="$2"; shift 2 ;;
    --superlink) [ $# -ge 2 ] || die "--superlink needs HOST:PORT"; superlink="$2"; shift 2 ;;
    --ca) [ $# -ge 2 ] || die "--ca needs a file"; ca_cert="$2"; shift 2 ;;
    --key) [ $# -ge 2 ] || die "--key needs a file"; auth_key="$2"; shift 2 ;;
    --privacy-budget) [ $# -ge 2 ] || die "--privacy-budget needs a number"; privacy_budget="$2"; shift 2 ;;
    --allowed-tasks) [ $# -ge 2 ] || die "--allowed-tasks needs a list"; ALLOWED_TASKS="$2"; shift 2 ;;
    --port) [ $# -ge 2 ] || die "--port needs a number"; runtime_port="$2"; shift 2 ;;
    --allow-training-without-privacy) allow_no_dp=true; shift ;;
    --require-approval) require_approval=true; shift ;;
    --no-site-worker) site_worker=false; shift ;;
    --site-worker-idle-minutes) [ $# -ge 2 ] || die "--site-worker-idle-minutes needs a number"; worker_idle="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ -n "$site_name" ] || die "--site-name (SITE_NAME) is required: the name this site reports to the server"
[[ "$site_name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ ]] || die "site name '$site_name': letters, digits, '.', '_' and '-'"
[ -n "$data_path" ] || die "--data (DATA_PATH) is required: the site folder (manifest.csv + images)"
[ -d "$data_path" ] || die "data folder $data_path does not exist"
[ -f "$data_path/manifest.csv" ] || echo "site.sh: warning: $data_path/manifest.csv not found; check it with: medfed data check $data_path" >&2
[ -n "$state_dir" ] || die "--state (STATE_DIR) is required: the privacy ledger and the SuperNode's files"
[ -n "$superlink" ] || die "--superlink (SUPERLINK) HOST:PORT is required"
[[ "$runtime_port" =~ ^[0-9]+$ ]] || die "--port must be a number"
if [ -n "$privacy_budget" ]; then
  [[ "$privacy_budget" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--privacy-budget must be a number (ε), got '$privacy_budget'"
fi
if [ -n "$ALLOWED_TASKS" ]; then
  [[ "$ALLOWED_TASKS" =~ ^[a-z0-9-]+(,[a-z0-9-]+)*$ ]] || die "ALLOWED_TASKS must be comma-separated task names, e.g. classification,segmentation"
fi
case "$allow_no_dp" in true|false) ;; *) die "ALLOW_TRAINING_WITHOUT_PRIVACY must be true or false" ;; esac
case "$require_approval" in true|false) ;; *) die "REQUIRE_APPROVAL must be true or false" ;; esac
case "$site_worker" in true|false) ;; *) die "SITE_WORKER must be true or false" ;; esac
if [ -n "$worker_idle" ]; then
  [[ "$worker_idle" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--site-worker-idle-minutes must be a number of minutes, got '$worker_idle'"
fi
command -v flower-supernode >/dev/null || die "flower-supernode not found in $VENV_BIN (set VENV_BIN)"

tls=()
if [ "$insecure" = 1 ]; then
  {
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    echo "!!  INSECURE MODE: no TLS, no SuperNode key. Updates travel in clear text and the"
    echo "!!  server is not verified. Test only, never with patient data."
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  } >&2
  tls=(--insecure)
else
  [ -n "$ca_cert" ] || die "--ca (CA_CERT) is required: the federation CA certificate that signed the SuperLink's certificate"
  [ -f "$ca_cert" ] || die "$ca_cert does not exist"
  [ -n "$auth_key" ] || die "--key (AUTH_KEY) is required: this site's private key (make-certificates.sh --keys-only --site $site_name)"
  [ -f "$auth_key" ] || die "$auth_key does not exist"
  if [ -n "$(find "$auth_key" -perm /077 2>/dev/null)" ]; then
    die "$auth_key is readable by other users: chmod 600 it"
  fi
  tls=(--root-certificates "$ca_cert" --auth-supernode-private-key "$auth_key")
fi
if [ "$allow_no_dp" = true ]; then
  echo "site.sh: WARNING: this site will train WITHOUT differential privacy if a run asks for it." >&2
fi

umask 077
mkdir -p "$state_dir"
state_dir="$(cd "$state_dir" && pwd)"
data_path="$(cd "$data_path" && pwd)"
mkdir -p "$state_dir/flwr-home" "$state_dir/uv-cache" "$state_dir/tmp"
export FLWR_HOME="$state_dir/flwr-home"
export UV_CACHE_DIR="$state_dir/uv-cache"
export TMPDIR="$state_dir/tmp"
export UV_OFFLINE=1

# The node config as a TOML file (values typed and quoted by Python: paths may hold spaces).
"$VENV_BIN/python" - "$state_dir/node-config.toml" "$site_name" "$data_path" "$state_dir" \
  "$privacy_budget" "$ALLOWED_TASKS" "$allow_no_dp" "$require_approval" "$site_worker" "$worker_idle" <<'PY'
import json
import sys

path, name, data, state, budget, allowed, no_dp, approval, worker, idle = sys.argv[1:]
lines = [
    f"site-name = {json.dumps(name)}",
    f"data-path = {json.dumps(data)}",
    f"state-dir = {json.dumps(state)}",
]
if budget:
    lines.append(f"privacy-budget = {float(budget)!r}")
if allowed:
    lines.append(f"allowed-tasks = {json.dumps(allowed)}")
if no_dp == "true":
    lines.append("allow-training-without-privacy = true")
if approval == "true":
    lines.append("require-approval = true")
if worker == "false":
    lines.append("site-worker = false")
if idle:
    lines.append(f"site-worker-idle-minutes = {float(idle)!r}")
with open(path, "w", encoding="utf-8") as f:
    f.write("# written by deploy/site.sh at every start: edit the site's settings there, not here\n")
    f.write("\n".join(lines) + "\n")
PY

echo "site.sh: site $site_name -> SuperLink $superlink, data $data_path, state $state_dir" >&2
exec flower-supernode "${tls[@]}" \
  --superlink "$superlink" \
  --node-config "$state_dir/node-config.toml" \
  --isolation subprocess \
  --host 127.0.0.1 --port "$runtime_port" \
  "${extra[@]+"${extra[@]}"}"
