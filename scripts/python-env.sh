#!/usr/bin/env bash
# Create (once) the Python environment pinned by requirements.lock and print its path.
#
# The environment lives outside the repository, in a cache directory keyed by the lock file's
# digest, so a fresh clone reuses it in seconds and a changed lock file builds a new one. The
# project itself is installed in editable mode into it on every call, which takes a few seconds.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${LATHE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lathe}
python=${PYTHON:-python3}
digest=$(sha256sum "$repo/requirements.lock" | cut -c1-16)
venv="$cache/venv-$digest"

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    echo "Creating the Python environment in $venv (first run only, several minutes)." >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip >&2
    "$venv/bin/pip" install --quiet -r "$repo/requirements.lock" >&2
    touch "$venv/.complete"
fi
# setuptools warns on every editable install that folders in the working directory could
# shadow the packages. No such folder exists here, so the warning is noise.
PYTHONWARNINGS=ignore "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$repo" >&2
echo "$venv"
