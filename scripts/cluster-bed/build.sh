#!/usr/bin/env bash
# Build (once) the binaries of the cluster test bed and print the directory that contains them.
#
# kube-apiserver, kube-controller-manager, kube-scheduler and etcd are compiled from the Go
# module proxy through go.mod beside this script, which pins k8s.io/kubernetes and its staging
# modules (etcd comes at the version that Kubernetes release requires). kwok is installed with
# `go install` at its own release, because it depends on other k8s.io/* versions. The binaries
# go to a cache directory outside the repository, named after the versions in versions.env, so
# later runs print the directory at once. The first build takes tens of minutes on 2 cores.
#
# Usage: build.sh [--print-bin-dir]
#   --print-bin-dir  print the directory without building anything.
# Environment: LATHE_CACHE (cache root), GO (the go command), BUILD_JOBS (go build -p, default 2).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${LATHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lathe}
bed_dir="$cache/cluster-bed/$KUBERNETES_VERSION-$KWOK_VERSION"
bin_dir="$bed_dir/bin"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
# The kwok Stage objects that the bed passes to kwok --config; see write_kwok_stages.
stages_file=kwok-stages.yaml

if [ "${1:-}" = "--print-bin-dir" ]; then
    echo "$bin_dir"
    exit 0
fi

binaries_built() {
    local name
    for name in "${binaries[@]}"; do
        [ -x "$bin_dir/$name" ] || return 1
    done
}

# The stages file must be the current one: pod completion honours the delay annotation, which
# the cluster suite uses to keep training pods running while it acts on them.
all_built() {
    binaries_built && grep -q 'pod-complete.stage.kwok.x-k8s.io/delay' "$bin_dir/$stages_file" \
        2>/dev/null
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
# A second build.sh (make and pytest at once) waits here for the first instead of racing it.
exec 9>"$bed_dir/build.lock"
flock 9
if all_built; then
    echo "$bin_dir"
    exit 0
fi

build_binaries() {
    partial="$bed_dir/bin.partial"
    rm -rf "$partial"
    mkdir -p "$partial"

    # The Kubernetes release build stamps these variables; without them /version reports v0.0.0.
    minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
    version_pkg=k8s.io/component-base/version
    kube_ldflags="-s -w -X $version_pkg.gitVersion=$KUBERNETES_VERSION -X $version_pkg.gitMajor=1"
    kube_ldflags+=" -X $version_pkg.gitMinor=$minor -X $version_pkg.gitTreeState=clean"
    kube_ldflags+=" -X $version_pkg.buildDate=1970-01-01T00:00:00Z"

    echo "Building the cluster test bed into $bin_dir (first run only)." >&2
    cd "$here"
    for name in kube-apiserver kube-controller-manager kube-scheduler; do
        echo "Building $name $KUBERNETES_VERSION." >&2
        "$go" build -p "$jobs" -trimpath -ldflags="$kube_ldflags" -o "$partial/$name" \
            "k8s.io/kubernetes/cmd/$name"
    done
    etcd_version=$("$go" list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
    echo "Building etcd $etcd_version." >&2
    "$go" build -p "$jobs" -trimpath -ldflags="-s -w" -o "$partial/etcd" go.etcd.io/etcd/server/v3

    echo "Building kwok $KWOK_VERSION." >&2
    # go install pkg@version resolves kwok's own go.mod, outside this module.
    (cd "$partial" && GOFLAGS=-buildvcs=false GOBIN="$partial" \
        "$go" install -p "$jobs" -trimpath -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")

    rm -rf "$bin_dir"
    mv "$partial" "$bin_dir"
}

# Concatenate the Stage objects that kwokctl uses by default (kwok itself has none): nodes become
# Ready and send heartbeats, pods become Running, pods owned by a Job then succeed after a delay, and
# pods marked for deletion are deleted. They are taken from the kwok module at KWOK_VERSION, so
# they match the binary.
write_kwok_stages() {
    local kwok_dir stage part
    kwok_dir=$("$go" mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" \
        | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
    if [ ! -d "$kwok_dir/kustomize/stage" ]; then
        echo "build.sh: kwok's stages were not found in the module at '$kwok_dir'." >&2
        exit 1
    fi
    part="$bin_dir/$stages_file.partial"
    : >"$part"
    # pod/general/pod-complete waits for the pod's `pod-complete.stage.kwok.x-k8s.io/delay`
    # annotation (1 to 6 s when it is absent), so a test can hold a Job's pods running.
    for stage in node/fast/node-initialize node/heartbeat/node-heartbeat pod/fast/pod-ready \
        pod/general/pod-complete pod/fast/pod-delete; do
        echo "---" >>"$part"
        cat "$kwok_dir/kustomize/stage/$stage.yaml" >>"$part"
    done
    mv "$part" "$bin_dir/$stages_file"
}

started=$(date +%s)
cd "$here"
if ! binaries_built; then
    build_binaries
fi
write_kwok_stages
echo "The cluster test bed was ready in $(( $(date +%s) - started )) s." >&2
echo "$bin_dir"
