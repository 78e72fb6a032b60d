"""Entry point of every stage workload: `python -m lathe_trainer STAGE --config FILE`.

Under `torchrun` the same entry point runs once per process (`torchrun -m lathe_trainer ...`).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import os
import sys
import traceback

from lathe_trainer import remote
from lathe_trainer.stage import EXIT_PERMANENT, StageError, load_config

# Stage name -> module with a `run(config, resume: bool) -> dict` function returning metrics.
STAGES = {
    "corpus": "lathe_trainer.corpus.stage",
    "tokenizer": "lathe_trainer.tokenizer.stage",
    "pretrain": "lathe_trainer.pretrain.stage",
    "finetune": "lathe_trainer.finetune.stage",
    "export": "lathe_trainer.export.stage",
}


def main(argv: list[str] | None = None, exit_on_error: bool = False) -> int:
    """Run one stage and return its exit code; with `exit_on_error`, end the process at once
    on a StageError (see the end of this file)."""
    parser = argparse.ArgumentParser(prog="python -m lathe_trainer")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--config", required=True, help="Path of the stage config JSON.")
    parser.add_argument(
        "--resume", action="store_true", help="Continue from the latest checkpoint, if any."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = load_config(args.config)
    module = importlib.import_module(STAGES[args.stage])
    try:
        with remote.staged(config) as local_config:
            module.run(local_config, resume=args.resume)
    except StageError as error:
        # One write call: the processes of a torchrun group share the log, and separate writes
        # of two processes' messages would interleave within a line.
        _write_error(f"error: {error}\n")
        if exit_on_error:
            remote.exit_process(EXIT_PERMANENT)
        return EXIT_PERMANENT
    return 0


def _write_summary(error: BaseException) -> None:
    """Repeat the first line of a multi-line exception message after its traceback.

    obstore's errors put dozens of lines of Rust debug output after the first line, and
    `lathe run` and the Failed condition quote only the last lines of a failed stage's log.
    """
    lines = str(error).strip().splitlines()
    if len(lines) > 1:
        _write_error(f"{type(error).__name__}: {lines[0].strip()}\n")


def _write_error(text: str) -> None:
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):
        # A replaced sys.stderr, as under pytest's capture, has no file descriptor.
        sys.stderr.write(text)


if __name__ == "__main__":
    # A crash in native code (SIGSEGV, SIGABRT) then leaves every thread's Python stack in the
    # log, which is all a failed pod keeps.
    faulthandler.enable()
    # A failed stage ends inside its except block, before Python frees the exception and the
    # frames that hold the DDP model. Freeing DDP's reducer destroys its gloo process group
    # while this thread holds the GIL. A gloo thread that still needs the GIL to finish a work
    # item then deadlocks the process.
    try:
        code = main(exit_on_error=True)
    except SystemExit as stop:
        # SIGTERM ends a stage with SystemExit (remote.staged), which must end the same way.
        remote.exit_process(stop.code if isinstance(stop.code, int) else 1)
    except BaseException as error:
        traceback.print_exc()
        _write_summary(error)
        remote.exit_process(130 if isinstance(error, KeyboardInterrupt) else 1)
    remote.exit_process(code)
