#!/usr/bin/env bash
# Certificates and keys for a medfed (Flower 1.42) deployment.
#
#   deploy/make-certificates.sh --out DIR [--san IP:10.0.0.5 --san DNS:fl.hospital.org ...]
#                               [--site hospital-a --site hospital-b ... | hospital-a hospital-b ...]
#                               [--days N] [--ca-days N] [--keys-only] [--force]
#
# What it writes (private keys mode 600, folders 700):
#   DIR/ca/ca.key, ca.crt            the federation's private CA. ca.key signs the SuperLink's TLS
#                                    certificate: keep it offline, never copy it to a server or site.
#                                    Created when missing, otherwise reused (never overwritten).
#   DIR/superlink/server.key, server.crt, ca.crt
#                                    the SuperLink's TLS key + certificate (signed by the CA), issued
#                                    when at least one --san is given. IP:127.0.0.1 and DNS:localhost
#                                    are always added: the SuperLink's own ServerApp process connects
#                                    back to it over loopback and verifies this certificate.
#   DIR/sites/NAME/NAME.key, NAME.pub, ca.crt
#                                    per site: an ECDSA P-384 key pair (OpenSSH format, made by
#                                    `ssh-keygen -t ecdsa -b 384`, what `flower-supernode
#                                    --auth-supernode-private-key` and `flwr supernode register`
#                                    read) plus the CA certificate the site uses to verify the SuperLink.
#
# --keys-only: only the site key pairs (no CA, no TLS certificate). Meant to be run by the hospital
# itself, so that its private key never leaves the site: send NAME.pub to the coordinator.
# --force: overwrite an existing SuperLink key/certificate or site key pair (the CA is never
# overwritten: to replace the CA, use a new --out folder and re-issue everything).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "make-certificates.sh: $*" >&2; exit 2; }

out=""
sans=()
sites=()
days=825          # a TLS server certificate should not outlive ~2 years
ca_days=3650
keys_only=0
force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || die "--out needs a folder"; out="$2"; shift 2 ;;
    --out=*) out="${1#*=}"; shift ;;
    --san) [ $# -ge 2 ] || die "--san needs a value such as IP:10.0.0.5 or DNS:fl.example.org"; sans+=("$2"); shift 2 ;;
    --san=*) sans+=("${1#*=}"); shift ;;
    --site) [ $# -ge 2 ] || die "--site needs a name"; sites+=("$2"); shift 2 ;;
    --site=*) sites+=("${1#*=}"); shift ;;
    --days) [ $# -ge 2 ] || die "--days needs a number"; days="$2"; shift 2 ;;
    --ca-days) [ $# -ge 2 ] || die "--ca-days needs a number"; ca_days="$2"; shift 2 ;;
    --keys-only) keys_only=1; shift ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; sites+=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) sites+=("$1"); shift ;;
  esac
done

[ -n "$out" ] || die "--out DIR is required (see --help)"
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"
done
[[ "$days" =~ ^[0-9]+$ && "$ca_days" =~ ^[0-9]+$ ]] || die "--days and --ca-days take whole numbers"
if [ "$keys_only" = 1 ] && [ ${#sans[@]} -gt 0 ]; then
  die "--keys-only makes site keys only; drop --san"
fi
if [ ${#sans[@]} -eq 0 ] && [ ${#sites[@]} -eq 0 ] && [ ! -f "$out/ca/ca.key" ] && [ "$keys_only" = 0 ]; then
  # A first run with no arguments: a CA and a certificate for a SuperLink on this machine.
  sans=("DNS:localhost")
fi

# Validate names and SANs before anything is written.
for site in "${sites[@]+"${sites[@]}"}"; do
  [[ "$site" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ ]] \
    || die "site name '$site': use letters, digits, '.', '_' and '-' (at most 63 characters)"
done
san_list="IP:127.0.0.1,DNS:localhost"
for san in "${sans[@]+"${sans[@]}"}"; do
  [[ "$san" =~ ^(IP|DNS):[A-Za-z0-9.:*_-]+$ ]] || die "--san '$san': expected IP:<address> or DNS:<name>"
  case ",$san_list," in *",$san,"*) ;; *) san_list="$san_list,$san" ;; esac
done

# Refuse to overwrite keys (all checks first, so a refusal writes nothing).
existing=()
if [ ${#sans[@]} -gt 0 ]; then
  for f in "$out/superlink/server.key" "$out/superlink/server.crt"; do [ -e "$f" ] && existing+=("$f"); done
fi
for site in "${sites[@]+"${sites[@]}"}"; do
  for f in "$out/sites/$site/$site.key" "$out/sites/$site/$site.pub"; do [ -e "$f" ] && existing+=("$f"); done
done
if [ ${#existing[@]} -gt 0 ] && [ "$force" = 0 ]; then
  printf 'make-certificates.sh: refusing to overwrite existing keys (use --force to replace them):\n' >&2
  printf '  %s\n' "${existing[@]}" >&2
  exit 1
fi
if [ -e "$out/ca/ca.crt" ] && [ ! -e "$out/ca/ca.key" ] && [ ${#sans[@]} -gt 0 ]; then
  die "$out/ca/ca.crt exists without ca/ca.key: cannot sign a SuperLink certificate"
fi

umask 077
mkdir -p "$out"
chmod 700 "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ "$keys_only" = 0 ]; then
  mkdir -p "$out/ca"
  if [ -f "$out/ca/ca.key" ] && [ -f "$out/ca/ca.crt" ]; then
    echo "using the existing CA in $out/ca"
  else
    cat > "$work/ca.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
O = medfed federation
CN = medfed federation CA
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
    openssl ecparam -name secp384r1 -genkey -noout -out "$work/ca.key"
    openssl req -x509 -new -sha384 -config "$work/ca.cnf" -key "$work/ca.key" -days "$ca_days" \
      -set_serial "0x$(openssl rand -hex 16)" -out "$work/ca.crt"
    mv "$work/ca.key" "$out/ca/ca.key"
    mv "$work/ca.crt" "$out/ca/ca.crt"
    chmod 600 "$out/ca/ca.key"
    chmod 644 "$out/ca/ca.crt"
    echo "created the CA: $out/ca/ca.crt (keep $out/ca/ca.key offline)"
  fi
  chmod 700 "$out/ca"
fi

if [ ${#sans[@]} -gt 0 ]; then
  mkdir -p "$out/superlink"
  chmod 700 "$out/superlink"
  first_dns=""
  for san in "${sans[@]}"; do
    case "$san" in DNS:*) first_dns="${san#DNS:}"; break ;; esac
  done
  cn="${first_dns:-${sans[0]#*:}}"
  cat > "$work/server.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyAgreement
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = $san_list
EOF
  openssl ecparam -name secp384r1 -genkey -noout -out "$work/server.key"
  openssl req -new -sha384 -key "$work/server.key" -subj "/O=medfed federation/CN=$cn" -out "$work/server.csr"
  openssl x509 -req -sha384 -in "$work/server.csr" -CA "$out/ca/ca.crt" -CAkey "$out/ca/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$work/server.ext" \
    -out "$work/server.crt" 2>/dev/null
  openssl verify -CAfile "$out/ca/ca.crt" "$work/server.crt" >/dev/null
  mv -f "$work/server.key" "$out/superlink/server.key"
  mv -f "$work/server.crt" "$out/superlink/server.crt"
  cp "$out/ca/ca.crt" "$out/superlink/ca.crt"
  chmod 600 "$out/superlink/server.key"
  chmod 644 "$out/superlink/server.crt" "$out/superlink/ca.crt"
  echo "issued the SuperLink certificate: $out/superlink/server.crt (SANs: $san_list; valid $days days)"
fi

for site in "${sites[@]+"${sites[@]}"}"; do
  dir="$out/sites/$site"
  mkdir -p "$dir"
  chmod 700 "$dir"
  rm -f "$work/key" "$work/key.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "medfed-site:$site" -f "$work/key"
  mv -f "$work/key" "$dir/$site.key"
  mv -f "$work/key.pub" "$dir/$site.pub"
  chmod 600 "$dir/$site.key"
  chmod 644 "$dir/$site.pub"
  if [ -f "$out/ca/ca.crt" ]; then
    cp "$out/ca/ca.crt" "$dir/ca.crt"
    chmod 644 "$dir/ca.crt"
  fi
  echo "site $site: private key $dir/$site.key (stays at the site), public key $dir/$site.pub (register it)"
done
