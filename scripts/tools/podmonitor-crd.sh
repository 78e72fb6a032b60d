#!/usr/bin/env bash
# Fetch (once) the Prometheus Operator's PodMonitor CRD and print the path of its YAML file.
#
# The cluster tests install this CRD to check the PodMonitors that the operator creates against
# the real schema. The file is example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml
# of the module github.com/prometheus-operator/prometheus-operator at a pinned release, downloaded
# from the Go module proxy, which checks the module against the Go checksum database. The file is
# copied to a cache directory outside the repository named after that release, so later runs
# print the path at once.
#
# Usage: podmonitor-crd.sh [--print-path]
#   --print-path  print where the file goes without downloading anything.
# Environment: LATHE_CACHE (cache root), GO (the go command).
set -euo pipefail

# v0.85.0 is the latest release that the Go module proxy served when this was pinned.
PROMETHEUS_OPERATOR_VERSION=v0.85.0
MODULE=github.com/prometheus-operator/prometheus-operator
CRD_FILE=monitoring.coreos.com_podmonitors.yaml
cache=${LATHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lathe}
dir="$cache/tools/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION"

if [ "${1:-}" = "--print-path" ]; then
    echo "$dir/$CRD_FILE"
    exit 0
fi
if [ -f "$dir/$CRD_FILE" ]; then
    echo "$dir/$CRD_FILE"
    exit 0
fi

go=${GO:-go}
if ! command -v "$go" >/dev/null; then
    echo "podmonitor-crd.sh: the go command was not found; install Go 1.26 or set GO to its" \
        "path." >&2
    exit 1
fi
export GOTOOLCHAIN=local
mkdir -p "$cache/tools"
# A second podmonitor-crd.sh (make and pytest at once) waits here instead of racing the first.
exec 9>"$cache/tools/prometheus-operator-crds.lock"
flock 9
if [ -f "$dir/$CRD_FILE" ]; then
    echo "$dir/$CRD_FILE"
    exit 0
fi

echo "Downloading $MODULE@$PROMETHEUS_OPERATOR_VERSION for its PodMonitor CRD (first run only)." >&2
# go mod download MODULE@VERSION needs no go.mod; run it outside any module. On failure it
# exits non-zero and puts the reason in the JSON's Error field, which the message below prints.
download=$(cd "$cache/tools" && "$go" mod download -json "$MODULE@$PROMETHEUS_OPERATOR_VERSION" 2>&1) ||
    true
source_dir=$(printf '%s\n' "$download" | sed -n 's/^\t"Dir": "\(.*\)",\{0,1\}$/\1/p')
reason=$(printf '%s\n' "$download" | sed -n 's/^\t"Error": "\(.*\)",\{0,1\}$/\1/p')
source_file="$source_dir/example/prometheus-operator-crd/$CRD_FILE"
if [ -z "$source_dir" ] || [ ! -f "$source_file" ]; then
    echo "podmonitor-crd.sh: downloading $MODULE@$PROMETHEUS_OPERATOR_VERSION from the Go module" \
        "proxy failed (${reason:-the module has no example/prometheus-operator-crd/$CRD_FILE});" \
        "check GOPROXY and the network." >&2
    exit 1
fi
if ! grep -q '^  name: podmonitors.monitoring.coreos.com$' "$source_file"; then
    echo "podmonitor-crd.sh: $source_file does not define podmonitors.monitoring.coreos.com." >&2
    exit 1
fi
partial="$dir.partial"
rm -rf "$partial"
mkdir -p "$partial"
# The module cache is read-only; the copy is writable so that a later `rm -rf` of the cache works.
cp "$source_file" "$partial/$CRD_FILE"
chmod u+w "$partial/$CRD_FILE"
rm -rf "$dir"
mv "$partial" "$dir"
echo "$dir/$CRD_FILE"
