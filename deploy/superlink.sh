#!/usr/bin/env bash
# Start the Flower SuperLink of a deployment: TLS and SuperNode authentication by default.
# The ServerApp of every run executes on this machine, so its pool-dir is a folder here.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: deploy/superlink.sh [options] [-- extra flower-superlink options]

Runs `flower-superlink` in the foreground (exec, so its PID is this script's). One HTTPS
port serves the Fleet API (SuperNodes), the Control API (`flwr run`, `flwr supernode ...`)
and the Runtime API (the ServerApp processes it starts).

Options:
  --certs DIR      folder made by deploy/certs.sh with ca.crt, superlink.crt, superlink.key
                   (default: ./certs)
  --insecure       plain HTTP, no TLS, no SuperNode authentication (quick start on a
                   trusted network only)
  --no-node-auth   TLS but accept any SuperNode (default: only SuperNodes whose public key
                   was registered with `flwr supernode register`, see deploy/keys.sh)
  --host HOST      address to listen on (default: 0.0.0.0)
  --port PORT      port (default: 8000)
  --state DIR      keeps the SuperLink database (runs, registered SuperNode keys) across
                   restarts (default: $ALACARTE_HOME/superlink, ALACARTE_HOME defaulting to
                   ~/.cache/alacarte); --state '' keeps it in memory only
  --install-deps   let each run `uv sync` the app's dependencies into a fresh environment
                   (default: off, runs use this Python environment, which must have
                   alacarte installed: bash setup.sh)
  -h, --help       show this help

Environment: FLWR_HOME (default ~/.flwr) is where the SuperLink unpacks submitted apps.
USAGE
}

die() { echo "superlink.sh: $*" >&2; exit 2; }

CERTS=./certs
INSECURE=0
NODE_AUTH=1
HOST=0.0.0.0
PORT=8000
STATE="${ALACARTE_HOME:-$HOME/.cache/alacarte}/superlink"
INSTALL_DEPS=0
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --certs) CERTS="${2:?--certs needs a folder}"; shift 2 ;;
        --insecure) INSECURE=1; shift ;;
        --no-node-auth) NODE_AUTH=0; shift ;;
        --host) HOST="${2:?--host needs an address}"; shift 2 ;;
        --port) PORT="${2:?--port needs a number}"; shift 2 ;;
        --state) STATE="${2?--state needs a folder}"; shift 2 ;;
        --install-deps) INSTALL_DEPS=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
command -v flower-superlink >/dev/null || die "flower-superlink not found; install alacarte (bash setup.sh)"

ARGS=(--host "$HOST" --port "$PORT")
if [[ $INSECURE -eq 1 ]]; then
    ARGS+=(--insecure)
else
    for file in ca.crt superlink.crt superlink.key; do
        [[ -f "$CERTS/$file" ]] || die "$CERTS/$file is missing; make it with deploy/certs.sh or pass --insecure"
    done
    ARGS+=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/superlink.crt"
           --ssl-keyfile "$CERTS/superlink.key")
    [[ $NODE_AUTH -eq 0 ]] || ARGS+=(--enable-supernode-auth)
fi
if [[ -n "$STATE" ]]; then
    mkdir -p "$STATE"
    ARGS+=(--database "$STATE/state.db")
fi
[[ $INSTALL_DEPS -eq 1 ]] || ARGS+=(--disable-runtime-dependency-installation)

echo "superlink.sh: flower-superlink ${ARGS[*]} ${EXTRA[*]}" >&2
exec flower-superlink "${ARGS[@]}" "${EXTRA[@]}"
