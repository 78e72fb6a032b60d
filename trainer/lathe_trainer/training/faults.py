"""Fault injection for tests of the nonFinite policies on a healthy model.

NB: LATHE_FAULT_NAN_STEPS is a comma-separated list of optimizer steps whose loss the
PretrainJob and FineTune loops multiply by NaN. Each listed step is poisoned once, so a step that
is skipped or rolled back succeeds when it is tried again.
"""

from __future__ import annotations

import os

FAULT_NAN_STEPS_ENV = "LATHE_FAULT_NAN_STEPS"


def fault_nan_steps() -> frozenset[int]:
    """Return the steps that LATHE_FAULT_NAN_STEPS poisons (empty when unset)."""
    value = os.environ.get(FAULT_NAN_STEPS_ENV, "")
    return frozenset(int(item) for item in value.split(",") if item.strip())
