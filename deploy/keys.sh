#!/usr/bin/env bash
# Make SuperNode authentication keys (EC P-384, OpenSSH format) and optionally register
# their public halves with the SuperLink, binding each registered node to its source.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: deploy/keys.sh [--out DIR] [--register CONNECTION] NAME [NAME...]

For each NAME (the source id that SuperNode serves), writes DIR/NAME.key (private, mode
600: copy it to that SuperNode only and pass it as `deploy/supernode.sh --key`) and
DIR/NAME.key.pub (public). Existing keys are kept, never overwritten.

With --register, each public key is registered with the SuperLink, which gives it a fixed
node id, and DIR/node-sources.json records that id with NAME ({"<node id>": "NAME"}). Pass
that file (on the SuperLink's machine) to every run so that a node can only train the
source its key is bound to:

  flwr run . CONNECTION --run-config "node-sources='/abs/path/DIR/node-sources.json' ..."

A SuperLink started with node authentication (deploy/superlink.sh, the default with TLS)
accepts only SuperNodes whose public key was registered through its Control API:

  flwr supernode register DIR/NAME.key.pub CONNECTION     # CONNECTION: [superlink.CONNECTION]
  flwr supernode list CONNECTION                          #   in $FLWR_HOME/config.toml
  flwr supernode unregister NODE_ID CONNECTION            # revoke (then delete its
                                                          #   entry in node-sources.json)

Options:
  --out DIR              output folder (default: ./keys)
  --register CONNECTION  also register each public key (`flwr supernode register`) and
                         bind its node id to NAME in DIR/node-sources.json
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
PYTHON="${PYTHON:-python3}"

# Register DIR/NAME.key.pub and record "<node id>": "NAME" in DIR/node-sources.json (atomically).
register() {
    local name="$1" reply
    reply="$(flwr supernode register "$OUT/$name.key.pub" "$REGISTER" --name "$name" --format json)" \
        || die "flwr supernode register failed for $name: $reply"
    "$PYTHON" - "$OUT/node-sources.json" "$name" "$reply" <<'PY' || exit 2
import json, os, sys, tempfile
path, name, text = sys.argv[1:]
try:
    reply = json.loads(text)
except ValueError:
    reply = {}
if not reply.get("success") or not isinstance(reply.get("node-id"), int):
    sys.exit(f"keys.sh: flwr supernode register did not register {name}: {text.strip()[:500]}")
bindings = {}
if os.path.exists(path):
    with open(path) as f:
        bindings = json.load(f)
bindings[str(reply["node-id"])] = name
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".node-sources.")
with os.fdopen(fd, "w") as f:
    json.dump(bindings, f, indent=2, sort_keys=True)
os.replace(tmp, path)
print(f"registered {name}: node {reply['node-id']} is bound to source {name} in {path}")
PY
}

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
    [[ -z "$REGISTER" ]] || register "$name"
done
