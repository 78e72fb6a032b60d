"""How `lathe run` stops the processes of a stage it gives up on or is interrupted in."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from lathe.local.runner import _stop_processes

# A parent and a child that both ignore SIGTERM, as a torchrun whose worker hangs in a
# collective would; the parent prints the child's pid.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child stays a zombie until init, its new parent, reaps it.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_kills_workers_ignoring_sigterm():
    parent = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    child = int(parent.stdout.readline())
    assert alive(child)

    _stop_processes([parent], timeout_s=1.0)

    assert parent.returncode is not None
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def test_stop_kills_process_without_own_group():
    process = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE,
                               text=True)
    child = int(process.stdout.readline())
    _stop_processes([process], timeout_s=1.0)
    assert process.returncode is not None
    os.kill(child, 9)
