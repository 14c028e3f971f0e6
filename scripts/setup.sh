#!/usr/bin/env bash
# Installs what Corral needs on Debian 12. Safe to run again: it installs only what is missing.
set -euo pipefail

packages=(qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs iproute2 util-linux ca-certificates
  nftables dnsmasq-base python3-venv curl
  ceph-mon ceph-osd ceph-mgr ceph-common qemu-block-extra)
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

missing_packages() {
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}
missing_packages

# `corral image build-jeos` downloads the cloud kernel with apt: the package lists must know it.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  $sudo apt-get update -qq
fi
# Twice at most: Debian's qemu-system-x86 7.2 removes a newer qemu-utils (a backport some machines
# come with), and the second round brings back the matching 7.2 one.
for round in 1 2; do
  [ ${#missing[@]} -gt 0 ] || break
  echo "setup: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  missing_packages
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: could not install ${missing[*]}; install them with apt-get and run this again" >&2
  exit 1
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing; install Rust with rustup (https://rustup.rs) and run this again" >&2
  exit 1
fi
echo "setup: $(qemu-system-x86_64 --version | head -1); $(qemu-img --version | head -1)"
