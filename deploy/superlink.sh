#!/usr/bin/env bash
# The coordinator's side of a medfed deployment (Flower 1.42 SuperLink), secure by default.
#
#   deploy/superlink.sh [start] --certs DIR --state DIR [--host 0.0.0.0] [--port 8000] [-- FLAGS...]
#       Runs `flower-superlink` in the foreground (exec: stop it with SIGTERM / Ctrl-C / systemctl):
#       HTTPS with the certificate in DIR (server.crt, server.key, ca.crt, as written by
#       make-certificates.sh into OUT/superlink), --enable-supernode-auth (only SuperNodes whose
#       public key was registered may connect), --disable-runtime-dependency-installation (the
#       ServerApp runs in this installation's virtualenv; nothing is downloaded at run time),
#       ServerApps in subprocesses, and all state in --state DIR: FLWR_HOME, the SuperLink
#       database (registered SuperNodes survive restarts), uv, Ray and matplotlib folders. A relative
#       run-config `out-dir` lands under --state DIR (the SuperLink's working folder).
#       FLAGS after `--` go to flower-superlink unchanged.
#       --insecure: plain HTTP and no SuperNode authentication. For a throw-away test on one machine
#       only; prints a loud warning.
#
#   deploy/superlink.sh add-connection NAME --address HOST:PORT --ca CA.crt [--default]
#       Writes the SuperLink connection NAME into the Flower configuration file of the flwr CLI,
#       $FLWR_HOME/config.toml (default ~/.flwr/config.toml):
#           [superlink.NAME]
#           address = "HOST:PORT"
#           root-certificates = "/absolute/path/ca.crt"
#       (Flower 1.42 wants an absolute path here.) `--insecure` instead of `--ca` writes insecure = true.
#
#   deploy/superlink.sh register NAME SITE.pub [--name SITE]
#       Registers a site's public key with the SuperLink of connection NAME:
#       `flwr supernode register SITE.pub NAME --name SITE`. List: `flwr supernode list NAME`;
#       revoke: `flwr supernode unregister NODE_ID NAME`.
#
# Environment: VENV_BIN (default: the repository's .venv/bin); for start, MEDFED_SUPERLINK_CERTS,
# MEDFED_SUPERLINK_STATE, MEDFED_SUPERLINK_HOST, MEDFED_SUPERLINK_PORT stand for the options
# (systemd EnvironmentFile, docker compose); for add-connection and register, FLWR_HOME is the
# coordinator's flwr CLI folder (default ~/.flwr).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
VENV_BIN="${VENV_BIN:-$repo/.venv/bin}"
export PATH="$VENV_BIN:$PATH"   # the SuperLink starts `flower-superexec` / `flwr-serverapp` by name
# Flower phones home by default (usage telemetry, PyPI update check): off unless asked for.
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "superlink.sh: $*" >&2; exit 2; }

loud_warning() {
  local line="!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  {
    echo "$line"
    echo "!!  INSECURE MODE: TLS is OFF and SuperNode authentication is OFF."
    echo "!!  Model updates and metrics travel in clear text; ANY machine that can reach"
    echo "!!  this port can join the federation, submit runs, and read results."
    echo "!!  Use it only on a test machine, bound to 127.0.0.1. Never with patient data."
    echo "$line"
  } >&2
}

cmd_start() {
  local certs="${MEDFED_SUPERLINK_CERTS:-}" state="${MEDFED_SUPERLINK_STATE:-}"
  local host="${MEDFED_SUPERLINK_HOST:-0.0.0.0}" port="${MEDFED_SUPERLINK_PORT:-8000}" insecure=0
  local extra=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --certs) [ $# -ge 2 ] || die "--certs needs a folder"; certs="$2"; shift 2 ;;
      --state) [ $# -ge 2 ] || die "--state needs a folder"; state="$2"; shift 2 ;;
      --host) [ $# -ge 2 ] || die "--host needs an address"; host="$2"; shift 2 ;;
      --port) [ $# -ge 2 ] || die "--port needs a number"; port="$2"; shift 2 ;;
      --insecure) insecure=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; extra=("$@"); break ;;
      *) die "unknown option $1 (see --help)" ;;
    esac
  done
  [ -n "$state" ] || die "--state DIR is required (the SuperLink's database, FLWR_HOME and run outputs)"
  [[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number"
  command -v flower-superlink >/dev/null || die "flower-superlink not found in $VENV_BIN (set VENV_BIN)"

  local tls=()
  if [ "$insecure" = 1 ]; then
    loud_warning
    case "$host" in 127.0.0.1|localhost|::1) ;; *)
      echo "!!  and it listens on $host, not only on this machine." >&2 ;;
    esac
    tls=(--insecure)
  else
    [ -n "$certs" ] || die "--certs DIR is required (server.crt, server.key, ca.crt from make-certificates.sh), or --insecure for a local test"
    local f
    for f in server.crt server.key ca.crt; do
      [ -f "$certs/$f" ] || die "$certs/$f is missing (run deploy/make-certificates.sh --out OUT --san ...; use OUT/superlink)"
    done
    if [ -n "$(find "$certs/server.key" -perm /077 2>/dev/null)" ]; then
      die "$certs/server.key is readable by other users: chmod 600 it"
    fi
    certs="$(cd "$certs" && pwd)"
    tls=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.crt" --ssl-keyfile "$certs/server.key"
         --enable-supernode-auth)
  fi

  umask 077
  mkdir -p "$state"
  state="$(cd "$state" && pwd)"
  mkdir -p "$state/flwr-home" "$state/uv-cache" "$state/ray-tmp" "$state/tmp" "$state/matplotlib"
  export FLWR_HOME="$state/flwr-home"
  # the report's plots: matplotlib's font cache, made once (a read-only home, as in the container,
  # would make every run build it again in a new temporary folder)
  export MPLCONFIGDIR="$state/matplotlib"
  export UV_CACHE_DIR="$state/uv-cache"
  export RAY_TMPDIR="$state/ray-tmp"
  export TMPDIR="$state/tmp"
  export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
  export UV_OFFLINE=1
  cd "$state"
  echo "superlink.sh: flower-superlink on $host:$port (Fleet, Control and ServerApp runtime APIs), state in $state" >&2
  exec flower-superlink "${tls[@]}" \
    --disable-runtime-dependency-installation \
    --isolation subprocess \
    --database "$state/superlink.db" \
    --host "$host" --port "$port" \
    "${extra[@]+"${extra[@]}"}"
}

cmd_add_connection() {
  [ $# -ge 1 ] || die "add-connection NAME --address HOST:PORT --ca CA.crt [--default]"
  local name="$1" address="" ca="" insecure=0 default=0
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --address) [ $# -ge 2 ] || die "--address needs HOST:PORT"; address="$2"; shift 2 ;;
      --ca) [ $# -ge 2 ] || die "--ca needs a file"; ca="$2"; shift 2 ;;
      --insecure) insecure=1; shift ;;
      --default) default=1; shift ;;
      *) die "unknown option $1" ;;
    esac
  done
  [[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || die "connection name '$name': letters, digits, '_' and '-' only"
  [ -n "$address" ] || die "--address HOST:PORT is required"
  if [ "$insecure" = 1 ]; then
    loud_warning
    [ -z "$ca" ] || die "--insecure and --ca exclude each other"
  else
    [ -n "$ca" ] || die "--ca CA.crt is required (or --insecure for a local test)"
    [ -f "$ca" ] || die "$ca does not exist"
    ca="$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")"
  fi
  "$VENV_BIN/python" - "$name" "$address" "$ca" "$insecure" "$default" <<'PY'
import sys

from flwr.cli.flower_config import (
    read_flower_config,
    set_default_superlink_connection,
    write_superlink_connection,
)
from flwr.cli.typing import SuperLinkConnection

name, address, ca, insecure, default = sys.argv[1:]
if insecure == "1":
    connection = SuperLinkConnection(name=name, address=address, insecure=True)
else:
    connection = SuperLinkConnection(name=name, address=address, root_certificates=ca)
write_superlink_connection(connection)
if default == "1":
    set_default_superlink_connection(name)
print(f"connection {name!r} -> {address} written to {read_flower_config()[1]}")
PY
}

cmd_register() {
  [ $# -ge 2 ] || die "register CONNECTION SITE.pub [--name SITE]"
  local connection="$1" key="$2"
  shift 2
  [ -f "$key" ] || die "$key does not exist"
  case "$(head -c 20 "$key")" in ecdsa-sha2-nistp*) ;; *) die "$key is not an OpenSSH ECDSA public key (ssh-keygen -t ecdsa -b 384)" ;; esac
  exec flwr supernode register "$key" "$connection" "$@"
}

case "${1:-start}" in
  start) [ $# -gt 0 ] && shift; cmd_start "$@" ;;
  add-connection) shift; cmd_add_connection "$@" ;;
  register) shift; cmd_register "$@" ;;
  -h|--help|help) usage ;;
  -*) cmd_start "$@" ;;
  *) die "unknown command $1 (start, add-connection, register; see --help)" ;;
esac
