#!/usr/bin/env bash
# Make SuperNode authentication keys (EC P-384, OpenSSH format) and optionally register
# their public halves with the SuperLink.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: deploy/keys.sh [--out DIR] [--register CONNECTION] NAME [NAME...]

For each NAME, writes DIR/NAME.key (private, mode 600: copy it to that SuperNode only and
pass it as `deploy/supernode.sh --key`) and DIR/NAME.key.pub (public). Existing keys are
kept, never overwritten.

A SuperLink started with node authentication (deploy/superlink.sh, the default with TLS)
accepts only SuperNodes whose public key was registered through its Control API:

  flwr supernode register DIR/NAME.key.pub CONNECTION     # CONNECTION: [superlink.CONNECTION]
  flwr supernode list CONNECTION                          #   in $FLWR_HOME/config.toml
  flwr supernode unregister NODE_ID CONNECTION            # revoke

Options:
  --out DIR              output folder (default: ./keys)
  --register CONNECTION  also run `flwr supernode register` for each public key
  -h, --help             show this help
USAGE
}

die() { echo "keys.sh: $*" >&2; exit 2; }

OUT=./keys
REGISTER=""
NAMES=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
        --register) REGISTER="${2:?--register needs a connection name}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) NAMES+=("$1"); shift ;;
    esac
done
[[ ${#NAMES[@]} -gt 0 ]] || die "give at least one NAME (see --help)"
command -v ssh-keygen >/dev/null || die "ssh-keygen is not installed (apt-get install openssh-client)"
[[ -z "$REGISTER" ]] || command -v flwr >/dev/null || die "flwr not found; install alacarte (bash setup.sh)"

mkdir -p "$OUT"
for name in "${NAMES[@]}"; do
    [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "invalid NAME '$name': use letters, digits, '-', '_' or '.'"
    key="$OUT/$name.key"
    if [[ -f "$key" ]]; then
        echo "keeping the existing key $key"
    else
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$key"
        echo "created $key and $key.pub"
    fi
    [[ -z "$REGISTER" ]] || flwr supernode register "$key.pub" "$REGISTER" --name "$name"
done
