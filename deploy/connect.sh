#!/usr/bin/env bash
# Add a SuperLink connection to the Flower CLI's config ($FLWR_HOME/config.toml), so that
# `flwr run . NAME` submits runs to that SuperLink.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: deploy/connect.sh NAME HOST:PORT (--root-certificates CA_CRT | --insecure)

Appends to $FLWR_HOME/config.toml (FLWR_HOME defaults to ~/.flwr):

  [superlink.NAME]
  address = "HOST:PORT"
  root-certificates = "/absolute/path/ca.crt"     # or: insecure = true

Then:  flwr run . NAME --stream --run-config "pool-dir='/srv/alacarte/pool' ..."
       flwr supernode register KEY.pub NAME;  flwr supernode list NAME;  flwr ls NAME

An existing [superlink.NAME] entry is never changed: edit or remove it by hand.

Options:
  --root-certificates FILE  the deployment's CA certificate (ca.crt from deploy/certs.sh)
  --insecure                the SuperLink runs with --insecure (plain HTTP)
  -h, --help                show this help
USAGE
}

die() { echo "connect.sh: $*" >&2; exit 2; }

POSITIONAL=()
ROOT_CERT=""
INSECURE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --root-certificates) ROOT_CERT="${2:?--root-certificates needs a file}"; shift 2 ;;
        --insecure) INSECURE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) POSITIONAL+=("$1"); shift ;;
    esac
done
[[ ${#POSITIONAL[@]} -eq 2 ]] || die "give NAME and HOST:PORT (see --help)"
NAME="${POSITIONAL[0]}"
ADDRESS="${POSITIONAL[1]}"
[[ "$NAME" =~ ^[A-Za-z0-9_-]+$ ]] || die "invalid NAME '$NAME': use letters, digits, '-' or '_'"
[[ "$ADDRESS" =~ ^[^\"[:space:]]+:[0-9]+$ ]] || die "address must be HOST:PORT, got '$ADDRESS'"
if [[ $INSECURE -eq 1 ]]; then
    [[ -z "$ROOT_CERT" ]] || die "give either --root-certificates or --insecure, not both"
    SECURITY="insecure = true"
else
    [[ -n "$ROOT_CERT" ]] || die "give --root-certificates ca.crt (or --insecure)"
    [[ -f "$ROOT_CERT" ]] || die "--root-certificates '$ROOT_CERT' is not a file"
    ROOT_CERT="$(cd "$(dirname "$ROOT_CERT")" && pwd -P)/$(basename "$ROOT_CERT")"
    [[ "$ROOT_CERT" != *\"* && "$ROOT_CERT" != *\\* ]] || die "the CA path must not contain '\"' or '\\'"
    SECURITY="root-certificates = \"$ROOT_CERT\""
fi

CONFIG="${FLWR_HOME:-$HOME/.flwr}/config.toml"
if [[ ! -f "$CONFIG" ]]; then
    command -v flwr >/dev/null || die "flwr not found; install alacarte (bash setup.sh)"
    flwr config ls >/dev/null  # lets flwr write its default config (the local simulation)
fi
if grep -Eq "^\[superlink\.$NAME\][[:space:]]*$" "$CONFIG"; then
    die "$CONFIG already has [superlink.$NAME]; edit it there or pick another NAME"
fi
printf '\n[superlink.%s]\naddress = "%s"\n%s\n' "$NAME" "$ADDRESS" "$SECURITY" >> "$CONFIG"
echo "added [superlink.$NAME] ($ADDRESS) to $CONFIG; submit with: flwr run . $NAME --stream"
