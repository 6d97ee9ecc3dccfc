#!/usr/bin/env bash
# Make a private certificate authority and TLS server certificates for a deployment:
# one for the Flower SuperLink and one for the composition service (`alacarte serve`).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: deploy/certs.sh [options] --superlink HOSTS [--service HOSTS]

Creates (in --out, default ./certs):
  ca.crt, ca.key            the private CA (reused if present; keep ca.key offline)
  superlink.crt, .key       SuperLink server certificate
  service.crt, .key         `alacarte serve` certificate (only with --service)

Every server certificate is signed by ca.crt and carries a subjectAltName for each
given host name or IP address, plus localhost, 127.0.0.1 and ::1 (the SuperLink's own
ServerApp processes connect to it locally). Keys are EC P-256, mode 600.

Options:
  --superlink HOSTS  comma-separated DNS names / IPs the SuperNodes and `flwr` use to
                     reach the SuperLink, e.g. link.example.org,10.0.0.5
  --service HOSTS    comma-separated names / IPs of the composition service
  --out DIR          output folder (default: ./certs)
  --days N           validity of the server certificates (default: 365; CA: 3650)
  --force            replace existing server certificates (the CA is always kept)
  -h, --help         show this help

Use:
  SuperLink:  deploy/superlink.sh --certs DIR          (ca.crt, superlink.crt, superlink.key)
  SuperNode:  deploy/supernode.sh --root-certificates DIR/ca.crt ...
  flwr CLI:   root-certificates = "DIR/ca.crt" in $FLWR_HOME/config.toml
  service:    alacarte serve --tls-cert DIR/service.crt --tls-key DIR/service.key
  clients:    alacarte query --ca-cert DIR/ca.crt ...
USAGE
}

die() { echo "certs.sh: $*" >&2; exit 2; }

OUT=./certs
DAYS=365
FORCE=0
SUPERLINK_HOSTS=""
SERVICE_HOSTS=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --superlink) SUPERLINK_HOSTS="${2:?--superlink needs HOSTS}"; shift 2 ;;
        --service) SERVICE_HOSTS="${2:?--service needs HOSTS}"; shift 2 ;;
        --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
        --days) DAYS="${2:?--days needs a number}"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -n "$SUPERLINK_HOSTS$SERVICE_HOSTS" ]] || die "give --superlink HOSTS and/or --service HOSTS (see --help)"
[[ "$DAYS" =~ ^[1-9][0-9]*$ ]] || die "--days must be a positive integer, got '$DAYS'"
command -v openssl >/dev/null || die "openssl is not installed (apt-get install openssl)"

# "a.org,10.0.0.5" -> "DNS:a.org,IP:10.0.0.5,DNS:localhost,IP:127.0.0.1,IP:::1" (no duplicates)
san_list() {
    local entry sans=""
    local -A seen=()
    IFS=',' read -ra entries <<< "$1,localhost,127.0.0.1,::1"
    for entry in "${entries[@]}"; do
        [[ -n "$entry" && -z "${seen[$entry]:-}" ]] || continue
        seen[$entry]=1
        if [[ "$entry" =~ ^[0-9.]+$ || "$entry" == *:* ]]; then
            sans+=",IP:$entry"
        elif [[ "$entry" =~ ^[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?$ ]]; then
            sans+=",DNS:$entry"
        else
            die "'$entry' is neither a host name nor an IP address"
        fi
    done
    echo "${sans#,}"
}

make_ca() {
    if [[ -f "$OUT/ca.crt" && -f "$OUT/ca.key" ]]; then
        echo "using the existing CA $OUT/ca.crt"
        return
    fi
    openssl ecparam -name prime256v1 -genkey -noout -out "$OUT/ca.key"
    openssl req -x509 -new -key "$OUT/ca.key" -sha256 -days 3650 -subj "/CN=alacarte federation CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$OUT/ca.crt"
    echo "created the CA $OUT/ca.crt (keep $OUT/ca.key private, ideally offline)"
}

# make_server_cert NAME CN SANS: NAME.key + NAME.crt signed by the CA
make_server_cert() {
    local name="$1" cn="$2" sans="$3" ext="$OUT/$1.ext"
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n'`
          `'extendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$sans" > "$ext"
    openssl ecparam -name prime256v1 -genkey -noout -out "$OUT/$name.key"
    openssl req -new -key "$OUT/$name.key" -subj "/CN=$cn" -out "$OUT/$name.csr"
    if ! openssl x509 -req -in "$OUT/$name.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
            -days "$DAYS" -sha256 -extfile "$ext" -out "$OUT/$name.crt" 2>"$OUT/$name.err"; then
        die "openssl could not sign $name.crt: $(cat "$OUT/$name.err")"
    fi
    rm -f "$ext" "$OUT/$name.csr" "$OUT/$name.err"
    openssl verify -CAfile "$OUT/ca.crt" "$OUT/$name.crt" >/dev/null
    echo "created $OUT/$name.crt for $sans"
}

# Check every argument before writing anything.
declare -A WANTED=()
[[ -z "$SUPERLINK_HOSTS" ]] || WANTED[superlink]="$SUPERLINK_HOSTS"
[[ -z "$SERVICE_HOSTS" ]] || WANTED[service]="$SERVICE_HOSTS"
declare -A SANS=()
for name in "${!WANTED[@]}"; do
    SANS[$name]="$(san_list "${WANTED[$name]}")"
    if [[ -f "$OUT/$name.crt" && $FORCE -eq 0 ]]; then
        die "$OUT/$name.crt exists; pass --force to replace it"
    fi
done

mkdir -p "$OUT"
umask 077
make_ca
for name in "${!WANTED[@]}"; do
    make_server_cert "$name" "${WANTED[$name]%%,*}" "${SANS[$name]}"
done
chmod 644 "$OUT"/*.crt
