#!/usr/bin/env bash
# Re-checks what setup-host.sh established once (a reboot drops bpffs and
# nothing else), then fails early with a clear message instead of letting the
# kernel tests fail obscurely.
set -euo pipefail
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
[ -e "/lib/modules/$(uname -r)/build/include" ] || bash "$(dirname "$0")/setup-host.sh"
