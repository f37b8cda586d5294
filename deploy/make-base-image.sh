#!/usr/bin/env bash
# A base image for deploy/Dockerfile.server and deploy/Dockerfile.site made from Debian packages,
# for a host that reaches a Debian mirror but not Docker Hub (where python:3.11-slim-bookworm lives):
#
#   deploy/make-base-image.sh [--tag localhost/medfed-python:3.11-bookworm] [--tool podman|docker]
#                             [--mirror http://deb.debian.org/debian]
#                             [--security-mirror http://deb.debian.org/debian-security]
#
# Debian 12 "bookworm" (debootstrap, minbase) with python3 (3.11), python3-venv and ca-certificates,
# security updates applied, imported as TAG. Then build the images on it:
#   podman build --build-arg BASE=localhost/medfed-python:3.11-bookworm -f deploy/Dockerfile.site -t medfed-site .
# Needs root and debootstrap (Debian package `debootstrap`); takes a few minutes.
set -euo pipefail

die() { echo "make-base-image.sh: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

tag="localhost/medfed-python:3.11-bookworm"
tool=""
mirror="http://deb.debian.org/debian"
security="http://deb.debian.org/debian-security"
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) [ $# -ge 2 ] || die "--tag needs an image name"; tag="$2"; shift 2 ;;
    --tool) [ $# -ge 2 ] || die "--tool needs podman or docker"; tool="$2"; shift 2 ;;
    --mirror) [ $# -ge 2 ] || die "--mirror needs a URL"; mirror="$2"; shift 2 ;;
    --security-mirror) [ $# -ge 2 ] || die "--security-mirror needs a URL"; security="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
if [ -z "$tool" ]; then
  tool="$(command -v podman || command -v docker || true)"
  [ -n "$tool" ] || die "neither podman nor docker found (--tool)"
fi
case "$(basename "$tool")" in podman|docker) ;; *) die "--tool must be podman or docker, got $tool" ;; esac
command -v debootstrap >/dev/null || die "debootstrap not found (Debian: apt-get install debootstrap)"
[ "$(id -u)" = 0 ] || die "debootstrap needs root"

root="$(mktemp -d "${TMPDIR:-/tmp}/medfed-base.XXXXXX")"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror"
cat > "$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
chroot "$root" /bin/sh -c 'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get -y upgrade && apt-get clean'
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/*
tar -C "$root" -c . | "$tool" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$tag"
echo "make-base-image.sh: $tag ($("$tool" run --rm "$tag" python3 --version 2>&1 || echo 'python3 did not start'))"
