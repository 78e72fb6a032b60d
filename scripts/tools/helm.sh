#!/usr/bin/env bash
# Build (once) the helm binary that the chart tests use and print its path.
#
# helm is compiled from the Go module proxy with `go install` at a pinned release, into a cache
# directory outside the repository named after that release, so later runs print the path at
# once. helm v4 is tried first; if it does not build with the Go installed here, helm v3 is
# built instead. The first build takes several minutes on 2 cores.
#
# Usage: helm.sh [--print-path]
#   --print-path  print where helm v4 goes without building anything.
# Environment: LATHE_CACHE (cache root), GO (the go command), BUILD_JOBS (go build -p, default 2).
set -euo pipefail

HELM_V4_VERSION=v4.3.2
HELM_V3_VERSION=v3.21.4
cache=${LATHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lathe}
tools="$cache/tools"

helm_dir() { echo "$tools/helm-$1"; }

if [ "${1:-}" = "--print-path" ]; then
    echo "$(helm_dir "$HELM_V4_VERSION")/helm"
    exit 0
fi

# A fallback v3 build counts too: it is what the v4 build left behind when it failed.
for version in "$HELM_V4_VERSION" "$HELM_V3_VERSION"; do
    if [ -x "$(helm_dir "$version")/helm" ]; then
        echo "$(helm_dir "$version")/helm"
        exit 0
    fi
done

go=${GO:-go}
if ! command -v "$go" >/dev/null; then
    echo "helm.sh: the go command was not found; install Go 1.26 or set GO to its path." >&2
    exit 1
fi

# Use the Go installed here, never a downloaded toolchain; CGO off as in helm's release build.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
jobs=${BUILD_JOBS:-2}
mkdir -p "$tools"
# A second helm.sh (make and pytest at once) waits here for the first instead of racing it.
exec 9>"$tools/helm.lock"
flock 9

# install MODULE VERSION: go install MODULE/cmd/helm@VERSION into its cache directory.
install_helm() {
    local module=$1 version=$2 dir partial
    dir=$(helm_dir "$version")
    if [ -x "$dir/helm" ]; then
        return 0
    fi
    partial="$dir.partial"
    rm -rf "$partial"
    mkdir -p "$partial"
    echo "Building helm $version into $dir (first run only)." >&2
    # go install pkg@version resolves helm's own go.mod; run it outside any module. helm's
    # release build stamps its version through these variables, so `helm version` reports it.
    if ! (cd "$partial" && GOBIN="$partial" "$go" install -p "$jobs" -trimpath \
        -ldflags="-s -w -X $module/internal/version.version=$version" \
        "$module/cmd/helm@$version"); then
        rm -rf "$partial"
        return 1
    fi
    rm -rf "$dir"
    mv "$partial" "$dir"
}

started=$(date +%s)
if install_helm helm.sh/helm/v4 "$HELM_V4_VERSION"; then
    version=$HELM_V4_VERSION
else
    echo "helm.sh: helm $HELM_V4_VERSION did not build; building $HELM_V3_VERSION instead." >&2
    install_helm helm.sh/helm/v3 "$HELM_V3_VERSION"
    version=$HELM_V3_VERSION
fi
echo "helm $version was ready in $(( $(date +%s) - started )) s." >&2
echo "$(helm_dir "$version")/helm"
