#!/usr/bin/env bash
# Make sure `prometheus` and `promtool` are installed and print the directory that contains them.
#
# The observability tests run the real promtool (rule checks and rule unit tests) and a real
# Prometheus server. When either binary is missing from PATH, this installs Debian's
# `prometheus` package (Debian 12 ships 2.42 with promtool) and prints /usr/bin. The package's
# own service is never left running: invoke-rc.d is told not to start it, and a `prometheus`
# process that appears during the install is stopped.
#
# Usage: prometheus.sh    (needs root, or both binaries already on PATH)
set -euo pipefail

binary_dir() { dirname "$(command -v promtool)"; }

if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
    binary_dir
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "prometheus.sh: promtool or prometheus is missing and apt-get was not found;" \
        "install Prometheus 2.42 or later so that both are on PATH." >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "prometheus.sh: promtool or prometheus is missing and installing Debian's" \
        "prometheus package needs root; run 'apt-get install prometheus' as root." >&2
    exit 1
fi

# Processes named prometheus before the install belong to someone else and are left alone.
before=$(pgrep -x prometheus || true)

# NB: a policy-rc.d that exits 101 makes invoke-rc.d, which the package's postinst calls, skip
# the service start. Container images usually have one already; otherwise a temporary one is
# added and removed again on exit.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

echo "Installing Debian's prometheus package (promtool and prometheus)." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update >&2
apt-get install -y --no-install-recommends prometheus >&2

# Where systemd runs, the unit may have been enabled and started all the same.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl disable --now prometheus.service >&2 || true
fi
for pid in $(pgrep -x prometheus || true); do
    if ! grep -qx "$pid" <<<"$before"; then
        echo "Stopping the prometheus service (pid $pid) that the package started." >&2
        kill "$pid" || true
    fi
done

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    echo "prometheus.sh: the prometheus package was installed but promtool or prometheus" \
        "is still not on PATH; check 'dpkg -L prometheus'." >&2
    exit 1
fi
binary_dir
