"""Join a gloo group whose collectives time out after 2 s, let rank 1 arrive 5 s late, and sum
the ranks after `distributed.wait_for_all` (or a plain barrier with `--plain`).

Usage: `wait_worker.py RESULT_DIR [--plain]`, under torchrun with 2 processes. Each rank writes
`RESULT_DIR/rank-N.txt`: the sum, or the error that ended the wait.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

from lathe_trainer.training import distributed

distributed.COLLECTIVE_TIMEOUT = timedelta(seconds=2)
context = distributed.setup("gloo")
if context.rank == 1:
    time.sleep(5)
result = Path(sys.argv[1]) / f"rank-{context.rank}.txt"
try:
    if "--plain" in sys.argv:
        distributed.barrier(context)
    else:
        distributed.wait_for_all(context, timedelta(seconds=60))
    (total,) = distributed.all_reduce_sum(context, [float(context.rank)])
    result.write_text(f"sum {total:g}")
except RuntimeError as error:
    result.write_text(f"error {type(error).__name__}")
    # The other rank may still wait in the collective; leave without the teardown.
    os._exit(0)
distributed.teardown(context)
