#!/usr/bin/env bash
# Prepares this Debian 12 host for ambit: Debian packages, the kernel-header
# links bcc needs, bpffs. Idempotent: a second run only checks and prints.
set -euo pipefail

PACKAGES=(python3-bpfcc python3-venv python3-dev linux-headers-amd64 containernetworking-plugins
          iproute2 nftables python3-nftables tcpdump iperf3 make gcc)

log() { printf 'setup-host: %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (ambit creates namespaces, veths and eBPF programs)"; exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/{build,source}; this kernel ships
# no headers, Debian's newest linux-headers-*-amd64 compile tc programs fine.
kver=$(uname -r)
hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
common=${hdr%-amd64}-common
if [ -z "$hdr" ] || [ ! -d "$common" ]; then
    log "no Debian kernel headers under /usr/src (linux-headers-amd64 failed?)"; exit 1
fi
mkdir -p "/lib/modules/$kver"
for pair in "build:$hdr" "source:$common"; do
    link="/lib/modules/$kver/${pair%%:*}"; target="${pair#*:}"
    if [ "$(readlink "$link" 2>/dev/null)" != "$target" ]; then
        # a real directory here would be the kernel's own headers: leave it alone
        if [ -e "$link" ] && [ ! -L "$link" ]; then log "$link exists, kept"; continue; fi
        ln -sfn "$target" "$link"; log "linked $link -> $target"
    fi
done

if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf; log "mounted bpffs on /sys/fs/bpf"
fi
mkdir -p /var/run/netns
