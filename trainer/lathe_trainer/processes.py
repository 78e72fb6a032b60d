"""Child processes that end with the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

# prctl(2) option that has the kernel signal a process when the thread that started it ends.
PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """Return a function for Popen's preexec_fn that sends the child SIGTERM when the calling
    thread ends, even by SIGKILL.

    A child in a session of its own gets no signal from a SIGKILL of its parent's process
    group and no handler of the parent can run, so without this it would go on running.
    Start the child from a thread that lives as long as the child should. Linux only;
    elsewhere None.
    """
    if not sys.platform.startswith("linux"):
        return None
    # Loaded here, before the fork, so the child only makes the call.
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def set_death_signal() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)  # the parent ended before the call took effect

    return set_death_signal
