#!/usr/bin/env bash
# Build (once) SeaweedFS's `weed` binary, the S3-compatible object store of the s3:// tests,
# and print its path.
#
# `go install` refuses SeaweedFS because its go.mod has a replace directive, so the module is
# downloaded from the Go module proxy and built from its own directory. The binary goes to a
# cache directory outside the repository named after the pinned version, so later runs print
# the path at once. The first build takes several minutes on 2 cores.
#
# Usage: seaweedfs.sh [--print-path]
#   --print-path  print where the binary goes without building anything.
# Environment: LATHE_CACHE (cache root), GO (the go command), BUILD_JOBS (go build -p, default 2).
set -euo pipefail

# SeaweedFS 4.53 (`weed version`), as the Go module proxy serves it: no tagged module release.
SEAWEEDFS_VERSION=v0.0.0-20261109003541-7506e5f91cd6
cache=${LATHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lathe}
dir="$cache/tools/seaweedfs-$SEAWEEDFS_VERSION"

if [ "${1:-}" = "--print-path" ]; then
    echo "$dir/weed"
    exit 0
fi
if [ -x "$dir/weed" ]; then
    echo "$dir/weed"
    exit 0
fi

go=${GO:-go}
if ! command -v "$go" >/dev/null; then
    echo "seaweedfs.sh: the go command was not found; install Go 1.26 or set GO to its path." >&2
    exit 1
fi
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
jobs=${BUILD_JOBS:-2}
mkdir -p "$cache/tools"
# A second seaweedfs.sh (make and pytest at once) waits here for the first instead of racing it.
exec 9>"$cache/tools/seaweedfs.lock"
flock 9
if [ -x "$dir/weed" ]; then
    echo "$dir/weed"
    exit 0
fi

started=$(date +%s)
echo "Building SeaweedFS $SEAWEEDFS_VERSION into $dir (first run only)." >&2
source_dir=$("$go" mod download -json "github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION" |
    sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
if [ -z "$source_dir" ] || [ ! -d "$source_dir" ]; then
    echo "seaweedfs.sh: downloading github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION from the" \
        "Go module proxy failed; check GOPROXY and the network." >&2
    exit 1
fi
# The build runs in a writable copy, because the module cache is read-only and the build may
# update go.sum.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$source_dir" "$work/src"
chmod -R u+w "$work/src"
partial="$dir.partial"
rm -rf "$partial"
mkdir -p "$partial"
(cd "$work/src" && "$go" build -p "$jobs" -trimpath -ldflags="-s -w" -o "$partial/weed" ./weed)
rm -rf "$dir"
mv "$partial" "$dir"
echo "SeaweedFS was ready in $(( $(date +%s) - started )) s." >&2
echo "$dir/weed"
