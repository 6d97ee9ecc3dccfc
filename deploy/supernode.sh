#!/usr/bin/env bash
# Start a Flower SuperNode for one data source. Its data never leaves this machine: the
# ClientApp reads only the node's own --data-dir and sends back only the trained prompt.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: deploy/supernode.sh --superlink HOST:PORT --source NAME --data-dir DIR [options]
                           [-- extra flower-supernode options]

Runs `flower-supernode` in the foreground (exec, so its PID is this script's) with
--node-config "source='NAME' data-dir='DIR'".

Required:
  --superlink HOST:PORT     the SuperLink (a host name or IP its certificate names)
  --source NAME             this data source's id in the prompt pool: 1-128 letters, digits,
                            '-', '_' or '.', not starting with '.'
  --data-dir DIR            the local training data (the run config's `dataset` format,
                            e.g. the Fashion-MNIST IDX train files)

Security (TLS is the default):
  --root-certificates FILE  the deployment's CA certificate (ca.crt from deploy/certs.sh)
  --key FILE                this SuperNode's private key (deploy/keys.sh); its public key
                            must be registered: flwr supernode register FILE.pub CONNECTION
  --insecure                plain HTTP to a SuperLink started with --insecure

Options:
  --port PORT               this SuperNode's local Runtime API port, where its ClientApp
                            processes connect (default: 9094; every SuperNode on the same
                            machine needs its own)
  --max-wait-time SECONDS   give up when the SuperLink is unreachable this long
                            (default: retry forever)
  --install-deps            allow `uv sync` of the app's dependencies per run (default:
                            off, runs use this Python environment)
  -h, --help                show this help
USAGE
}

die() { echo "supernode.sh: $*" >&2; exit 2; }

SUPERLINK=""
SOURCE=""
DATA_DIR=""
ROOT_CERT=""
KEY=""
INSECURE=0
PORT=9094
MAX_WAIT=""
INSTALL_DEPS=0
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --superlink) SUPERLINK="${2:?--superlink needs HOST:PORT}"; shift 2 ;;
        --source) SOURCE="${2:?--source needs a name}"; shift 2 ;;
        --data-dir) DATA_DIR="${2:?--data-dir needs a folder}"; shift 2 ;;
        --root-certificates) ROOT_CERT="${2:?--root-certificates needs a file}"; shift 2 ;;
        --key) KEY="${2:?--key needs a file}"; shift 2 ;;
        --insecure) INSECURE=1; shift ;;
        --port) PORT="${2:?--port needs a number}"; shift 2 ;;
        --max-wait-time) MAX_WAIT="${2:?--max-wait-time needs seconds}"; shift 2 ;;
        --install-deps) INSTALL_DEPS=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ "$SUPERLINK" == *:* ]] || die "--superlink HOST:PORT is required (see --help)"
[[ -n "$SOURCE" ]] || die "--source NAME is required (see --help)"
if [[ ! "$SOURCE" =~ ^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$ ]]; then
    die "invalid --source '$SOURCE': use 1-128 ASCII letters, digits, '-', '_' or '.', not starting with '.'"
fi
[[ -n "$DATA_DIR" ]] || die "--data-dir DIR is required (see --help)"
[[ -d "$DATA_DIR" ]] || die "--data-dir '$DATA_DIR' is not a folder"
DATA_DIR="$(cd "$DATA_DIR" && pwd -P)"
[[ "$DATA_DIR" != *"'"* ]] || die "--data-dir must not contain a single quote: '$DATA_DIR'"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
command -v flower-supernode >/dev/null || die "flower-supernode not found; install alacarte (bash setup.sh)"

ARGS=(--superlink "$SUPERLINK" --port "$PORT" --node-config "source='$SOURCE' data-dir='$DATA_DIR'")
if [[ $INSECURE -eq 1 ]]; then
    [[ -z "$ROOT_CERT$KEY" ]] || die "--insecure cannot be combined with --root-certificates or --key"
    ARGS+=(--insecure)
else
    [[ -n "$ROOT_CERT" ]] || die "--root-certificates ca.crt is required (or --insecure for a plain-HTTP SuperLink)"
    [[ -f "$ROOT_CERT" ]] || die "--root-certificates '$ROOT_CERT' is not a file"
    ARGS+=(--root-certificates "$ROOT_CERT")
    if [[ -n "$KEY" ]]; then
        [[ -f "$KEY" ]] || die "--key '$KEY' is not a file (make one with deploy/keys.sh)"
        ARGS+=(--auth-supernode-private-key "$KEY")
    fi
fi
[[ -z "$MAX_WAIT" ]] || ARGS+=(--max-wait-time "$MAX_WAIT")
[[ $INSTALL_DEPS -eq 0 ]] || ARGS+=(--allow-runtime-dependency-installation)

echo "supernode.sh: flower-supernode ${ARGS[*]} ${EXTRA[*]}" >&2
exec flower-supernode "${ARGS[@]}" "${EXTRA[@]}"
