"""Run Lathe's Argo CD health checks (charts/lathe/argocd/*.lua) in a real Lua interpreter.

Argo CD runs each script with gopher-lua, a Lua 5.1 implementation, and passes the resource as
the global `obj`. This does the same with lupa's Lua 5.1 runtime, for the unit tests (status
objects shaped in code) and the cluster suite (objects read from the API server).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lupa import lua51

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "charts" / "lathe" / "argocd"

# Libraries that Argo CD does not open for health scripts; removed so a script using them fails.
UNAVAILABLE_GLOBALS = ("io", "os", "debug", "package", "require", "dofile", "loadfile")


def script_path(kind: str) -> Path:
    return SCRIPTS / f"lathe.dev_{kind}.lua"


def run_health(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Run the kind's health script on `obj` and return the table it returns, as a dict."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    for name in UNAVAILABLE_GLOBALS:
        lua.execute(f"{name} = nil")
    # A JSON round trip gives what Argo CD decodes from the API server: no Python-only types.
    lua.globals().obj = lua.table_from(json.loads(json.dumps(obj)), recursive=True)
    result = lua.execute(script_path(kind).read_text())
    return dict(result.items())
