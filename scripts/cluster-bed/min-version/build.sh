#!/usr/bin/env bash
# Build (once) the kube-apiserver and etcd of the minimum supported Kubernetes release and print
# the directory that contains them.
#
# tests/cluster/test_min_version.py starts these two on loopback to check that the CRDs install
# and their CEL rules reject invalid specs on the oldest release the chart allows. Both are
# compiled from the Go module proxy through go.mod beside this script, which pins
# k8s.io/kubernetes and its staging modules. etcd comes at the version that this Kubernetes
# release requires (v3.5.10 for v1.29.15). The binaries go to a cache directory outside the
# repository, named after versions.env. The first build took 231 to 298 s in two runs on 2
# shared cores, with the Go modules already downloaded (one run with an empty Go build cache).
#
# Usage: build.sh [--print-bin-dir]
#   --print-bin-dir  print the directory without building anything.
# Environment: LATHE_CACHE (cache root), GO (the go command), BUILD_JOBS (go build -p, default 2).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${LATHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lathe}
bed_dir="$cache/cluster-bed/min-$KUBERNETES_VERSION"
bin_dir="$bed_dir/bin"
binaries=(etcd kube-apiserver)

if [ "${1:-}" = "--print-bin-dir" ]; then
    echo "$bin_dir"
    exit 0
fi

all_built() {
    local name
    for name in "${binaries[@]}"; do
        [ -x "$bin_dir/$name" ] || return 1
    done
}

if all_built; then
    echo "$bin_dir"
    exit 0
fi

go=${GO:-go}
if ! command -v "$go" >/dev/null; then
    echo "build.sh: the go command was not found; install Go 1.26 or set GO to its path." >&2
    exit 1
fi
if ! grep -Eq "^\s*(require\s+)?k8s\.io/kubernetes $KUBERNETES_VERSION\b" "$here/go.mod"; then
    echo "build.sh: go.mod does not require k8s.io/kubernetes $KUBERNETES_VERSION from" \
        "versions.env; change both together." >&2
    exit 1
fi

# Use the Go installed here, never a downloaded toolchain. CGO is off as in the Kubernetes
# release build, which also skips the C compiler.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly"
jobs=${BUILD_JOBS:-2}

mkdir -p "$bed_dir"
# A second build.sh waits here for the first instead of racing it.
exec 9>"$bed_dir/build.lock"
flock 9
if all_built; then
    echo "$bin_dir"
    exit 0
fi

started=$(date +%s)
partial="$bed_dir/bin.partial"
rm -rf "$partial"
mkdir -p "$partial"
cd "$here"

# The Kubernetes release build stamps these variables; without them /version reports v0.0.0.
minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
version_pkg=k8s.io/component-base/version
kube_ldflags="-s -w -X $version_pkg.gitVersion=$KUBERNETES_VERSION -X $version_pkg.gitMajor=1"
kube_ldflags+=" -X $version_pkg.gitMinor=$minor -X $version_pkg.gitTreeState=clean"
kube_ldflags+=" -X $version_pkg.buildDate=1970-01-01T00:00:00Z"

echo "Building kube-apiserver $KUBERNETES_VERSION into $bin_dir (first run only)." >&2
"$go" build -p "$jobs" -trimpath -ldflags="$kube_ldflags" -o "$partial/kube-apiserver" \
    k8s.io/kubernetes/cmd/kube-apiserver
etcd_version=$("$go" list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
echo "Building etcd $etcd_version." >&2
"$go" build -p "$jobs" -trimpath -ldflags="-s -w" -o "$partial/etcd" go.etcd.io/etcd/server/v3

rm -rf "$bin_dir"
mv "$partial" "$bin_dir"
echo "The minimum-version bed was built in $(( $(date +%s) - started )) s." >&2
echo "$bin_dir"
