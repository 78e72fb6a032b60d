"""The `lathe` command line: run resource files on this machine, validate them, show lineage."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import obstore.exceptions
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from lathe import __version__, loader, preflight
from lathe.api import ModelDeployment
from lathe.errors import LatheError, ObjectStoreError
from lathe.local.runner import LocalRunner, ProgressEvent, StageResult

DEFAULT_SAMPLE = (
    "Hereditary nonpolyposis colorectal cancer is caused by mutations in MLH1, and patients "
    "with ataxia telangiectasia carry a higher risk of breast cancer."
)


def default_data_dir() -> Path:
    return Path(os.environ.get("LATHE_DATA_DIR", "../shared/data"))


class OutputConsole(Console):
    """A Console whose closed output (`lathe run | head -1`) stops lathe as SIGPIPE would.

    rich's own handler raises SystemExit(1), which passes the handlers that stop the stage
    processes and record the running stage as Interrupted. KeyboardInterrupt("SIGPIPE") takes
    the path of Ctrl-C and `kill` instead, and main() exits with 141, as a shell reports it.
    """

    def on_broken_pipe(self) -> None:
        _discard_output(self)
        raise KeyboardInterrupt(signal.Signals.SIGPIPE.name)


class ErrorConsole(Console):
    """A Console on stderr that drops what it cannot write, so that a closed stderr does not
    replace the error or interruption being reported."""

    def __init__(self) -> None:
        super().__init__(stderr=True, soft_wrap=True)

    def on_broken_pipe(self) -> None:
        _discard_output(self)


def _discard_output(console: Console) -> None:
    """Send the console's later output to /dev/null.

    Its stream still contains the unwritten text, and Python's flush of stdout at exit would fail
    with BrokenPipeError again and exit with 120.
    """
    console.quiet = True
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, console.file.fileno())
    finally:
        os.close(devnull)


def _is_checkout(directory: Path) -> bool:
    return (directory / "pyproject.toml").is_file() and (directory / "operator" / "lathe").is_dir()


def other_checkout_warning(cwd: Path | None = None) -> str | None:
    """Return a warning when the current directory is in a checkout of Lathe other than the
    one this code runs from.

    Every checkout on a machine shares one cached environment (scripts/python-env.sh), whose
    editable install points at the checkout that ran `make env` last, so `.venv/bin/lathe`
    can run another checkout's code.
    """
    code = Path(__file__).resolve().parents[2]
    if not _is_checkout(code):
        return None  # installed from a wheel, not run from a checkout
    cwd = (cwd or Path.cwd()).resolve()
    checkout = next((path for path in (cwd, *cwd.parents) if _is_checkout(path)), None)
    if checkout is None or checkout == code:
        return None
    return (f"warning: this lathe runs the code in {code}, not the checkout in the current "
            f"directory ({checkout}); run `make env` in {checkout} to use its code.")


class StageBars:
    """One progress bar per stage, fed by the runner's progress events."""

    def __init__(self, progress: Progress, resources):
        self.progress = progress
        self.tasks: dict[str, TaskID] = {
            # Each bar's clock starts when its stage does, not when the run does.
            resource.key: progress.add_task(
                f"{resource.kind} {resource.metadata.name}", total=None, status="pending",
                start=False,
            )
            for resource in resources
        }

    def __call__(self, event: ProgressEvent) -> None:
        task = self.tasks[event.key]
        if event.state in ("started", "reused") and not self.progress.tasks[task].started:
            self.progress.start_task(task)
        if event.state in ("reused", "succeeded"):
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, total=total, completed=total, status=event.message)
        elif event.state == "failed":
            self.progress.update(task, status="[red]failed")
        elif event.state in ("suspended", "waiting"):
            self.progress.update(task, status=event.message)
        elif event.state == "started":
            self.progress.update(task, status=event.message or "running")
        elif event.state == "progress":
            self.progress.update(
                task,
                total=event.total,
                completed=event.completed or 0,
                status=_progress_text(event.record),
            )


class StageLines:
    """Progress as plain lines, for output that is not a terminal (CI logs, `> file`).

    A live bar redraws in place, which a log file cannot show: rich prints nothing until the
    run ends. Each stage's start and end is one line, and a running stage prints its progress
    at most once every `interval_s` seconds.
    """

    def __init__(self, console: Console, resources, interval_s: float = 30.0,
                 clock=time.monotonic):
        self.console = console
        self.interval_s = interval_s
        self.clock = clock
        self.names = {resource.key: f"{resource.kind} {resource.metadata.name}"
                      for resource in resources}
        self.started: dict[str, float] = {}
        self.last_line: dict[str, float] = {}

    def __call__(self, event: ProgressEvent) -> None:
        name = self.names[event.key]
        now = self.clock()
        if event.state == "started":
            self.started[event.key] = self.last_line[event.key] = now
            self.console.print(f"{name}: started{'; ' + event.message if event.message else ''}.")
        elif event.state == "reused":
            self.console.print(f"{name}: reused the finished output of an earlier run.")
        elif event.state == "succeeded":
            seconds = now - self.started.get(event.key, now)
            self.console.print(f"{name}: succeeded in {seconds:.1f} s.")
        elif event.state == "failed":
            # The error itself ends the run's output, on stderr.
            self.console.print(f"{name}: failed.")
        elif event.state in ("suspended", "waiting"):
            self.console.print(f"{name}: {event.message}; not run.")
        elif event.state == "progress" and now - self.last_line.get(event.key, 0.0) >= (
            self.interval_s
        ):
            self.last_line[event.key] = now
            share = ""
            if event.total and event.completed is not None:
                share = f"{100 * event.completed / event.total:.0f}%, "
            text = _progress_text(event.record) or "running"
            self.console.print(f"{name}: {share}{text}")


def _progress_text(record: dict) -> str:
    parts = [record.get("message", "")]
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.3f}")
    if record.get("tokensPerSecond"):
        parts.append(f"{record['tokensPerSecond']:.0f} tok/s")
    return "  ".join(part for part in parts if part)


def _run(args: argparse.Namespace, console: Console) -> int:
    resources = loader.load_paths(args.file)
    width = max((len(f"{r.kind} {r.metadata.name}") for r in resources), default=0)
    progress = Progress(
        TextColumn(f"{{task.description:<{width}}}"),
        # A narrow bar leaves room for the status on an 80-column terminal.
        BarColumn(bar_width=20),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )
    runner = LocalRunner(Path(args.workspace), Path(args.data_dir))
    ordered = runner.check(resources)
    _print_from_workspace(console, runner)
    # The lock stays held while Triton serves from the workspace, so that another run cannot
    # replace the model repository under it.
    with runner.hold_workspace():
        if console.is_terminal:
            with progress:
                runner.on_progress = StageBars(progress, ordered)
                results = runner.run(ordered)
        else:
            runner.on_progress = StageLines(console, ordered)
            results = runner.run(ordered)
        _print_summary(console, results)
        for reason in runner.not_run.values():
            console.print(reason)

        deployments = [r for r in results.values() if isinstance(r.resource, ModelDeployment)]
        if args.serve and not deployments:
            console.print("--serve has no effect: this run exported no ModelDeployment to serve.")
        if deployments:
            from lathe.local import serving

            serving.serve_all(deployments, args.sample, console, keep_serving=args.serve)
    return 0


# The figures that show whether each stage did its job, from its manifest's metrics.
HEADLINE_METRICS = {
    "Corpus": (("documentsOut", "documents"),),
    "Tokenizer": (("fertility", "tokens per word"),),
    "PretrainJob": (("validationPerplexity", "validation perplexity"),),
    "FineTune": (("f1", "entity F1"),),
    "ModelDeployment": (("maxAbsDiff", "ONNX max abs diff"),),
}


def headline(kind: str, metrics: dict) -> str:
    """Return the main results of a stage as short text, such as "entity F1 0.4642"."""
    parts = []
    for key, label in HEADLINE_METRICS.get(kind, ()):
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        parts.append(f"{label} {value:.4g}")
    scratch = (metrics.get("fromScratch") or {}).get("f1") if kind == "FineTune" else None
    if isinstance(scratch, (int, float)):
        parts.append(f"from scratch {scratch:.4g}")
    if kind == "ModelDeployment" and metrics.get("quantization") == "deployed":
        # Quantization is optional and its F1 check can decline it, so the summary names the
        # model that Triton serves.
        parts.append("serving INT8")
    return ", ".join(parts)


def notes(resource, metrics: dict) -> list[str]:
    """Return what a finished stage reported that its headline figures do not show, and that
    a user would otherwise find only in its stage.log or report."""
    found = []
    if resource.kind == "Corpus":
        if metrics.get("malformed"):
            found.append(f"{metrics['malformed']} malformed records were counted and left "
                         "out; stats.json holds examples from each source.")
        if metrics.get("validationDocuments") == 0:
            found.append("the validation split is empty, so the stages after it report no "
                         "validation figures; raise spec.split.validationFraction.")
    elif resource.kind == "Tokenizer":
        shortfall = metrics.get("vocabShortfall")
        if isinstance(shortfall, int) and shortfall > 0:
            found.append(f"BPE learned {shortfall} tokens fewer than spec.vocabSize leaves "
                         "after the protected terms, because the training split has no more "
                         "pairs to merge; lower vocabSize or add training text.")
    elif resource.kind == "PretrainJob":
        if metrics.get("validationSequences") == 0:
            found.append("no validation perplexity: the Corpus's validation split fills no "
                         "sequence of spec.sequenceLength tokens.")
        elif "validationPerplexity" in metrics and metrics["validationPerplexity"] is None:
            found.append("no validation perplexity: the validation loss was not finite.")
    return found


def _print_summary(console: Console, results: dict[str, StageResult]) -> None:
    for result in results.values():
        how = "reused" if result.reused else f"ran in {result.seconds:.1f} s"
        metrics = result.manifest.get("metrics") or {}
        figures = headline(result.resource.kind, metrics)
        console.print(
            f"{result.resource.kind} {result.resource.metadata.name}: {how}"
            f"{', ' + figures if figures else ''}, artifact {result.manifest['digest'][:19]} at "
            f"{result.output_uri}"
        )
        for note in notes(result.resource, metrics):
            console.print(f"  Note: {note}")


def _print_from_workspace(console: Console, runner: LocalRunner) -> None:
    """Print the references resolved from stages that finished in an earlier run."""
    for found in runner.from_workspace.values():
        resolved = found.resolved
        console.print(
            f"{resolved.kind} {resolved.name}: not in the files given; using its finished "
            f"output from the workspace, artifact {resolved.digest[:19]} at {resolved.uri}"
        )


def _validate(args: argparse.Namespace, console: Console) -> int:
    resources = loader.load_paths(args.file)
    runner = LocalRunner(Path(args.workspace), Path(args.data_dir))
    runner.check(resources)
    _print_from_workspace(console, runner)
    console.print(f"{len(resources)} resource{'s are' if len(resources) != 1 else ' is'} "
                  "valid.")
    for resource in resources:
        for field, path in preflight.unchecked_paths(resource):
            console.print(f"Not checked: {resource.kind} {resource.metadata.name} {field} "
                          f"{path!r} is on an object store, which validate does not read; "
                          "a missing object fails the stage when it starts.")
    return 0


def _lineage(args: argparse.Namespace, console: Console) -> int:
    """Print the chain of manifests from an output directory back to the corpus sources."""
    from lathe.lineage import find_output, lineage_lines

    for line in lineage_lines(find_output(args.output)):
        console.print(line)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="lathe", description=__doc__)
    root.add_argument("-v", "--verbose", action="store_true", help="Log debug detail.")
    root.add_argument("--version", action="version", version=f"lathe {__version__}")
    commands = root.add_subparsers(dest="command", required=True)
    # -v is accepted after the command too (`lathe run -f x -v`); SUPPRESS keeps a -v given
    # before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="Log debug detail.")

    def with_files(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "-f", "--file", type=Path, action="append", required=True,
            help="Resource file, folder of resource files, or - for standard input; repeatable.",
        )
        command.add_argument(
            "--workspace", default="lathe-workspace",
            help="Directory for stage outputs (default: lathe-workspace in the current directory).",
        )
        command.add_argument(
            "--data-dir", default=str(default_data_dir()),
            help="Directory that relative data paths resolve against "
            "(default: $LATHE_DATA_DIR or ../shared/data).",
        )

    run = commands.add_parser(
        "run", parents=[common], help="Run every stage locally, in dependency order.",
        description="Run the stages of the resource files as local processes, in the order of "
        "their references, reusing stages that finished with the same spec and inputs. Ends "
        "with a Triton server answering a sample sentence when a ModelDeployment is given.",
    )
    with_files(run)
    run.add_argument("--sample", default=DEFAULT_SAMPLE, help="Sentence sent to Triton at the end.")
    run.add_argument(
        "--serve", action="store_true", help="Keep Triton running after the sample response, until "
        "interrupted."
    )
    run.set_defaults(handler=_run)

    validate = commands.add_parser(
        "validate", parents=[common], help="Check resource files without running them.",
        description="Check the resource files as `lathe run` does before it starts a stage: "
        "fields, references between resources, data files and patterns. Runs nothing.",
    )
    with_files(validate)
    validate.set_defaults(handler=_validate)

    lineage = commands.add_parser(
        "lineage", parents=[common], help="Print the lineage of a stage output.",
        description="Print the tree of inputs that a finished stage output was made from, with "
        "the digest of each stage output and data file, read from the manifests.",
    )
    lineage.add_argument(
        "output", help="Output directory of a finished stage (with manifest.json), its file:// "
        "URI as `lathe run` prints it, or the stage directory above it.",
    )
    lineage.set_defaults(handler=_lineage)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Long lines such as artifact URIs stay whole when the output is not a terminal, and digests
    # are not coloured as if they were numbers or addresses.
    console = OutputConsole(stderr=False, soft_wrap=True, highlight=False)
    warning = other_checkout_warning()
    if warning:
        ErrorConsole().print(warning, style="yellow", highlight=False, markup=False)
    # `kill` and a closed terminal stop lathe as Ctrl-C does, so that the stage processes and
    # tritonserver it started are stopped too instead of being left running.
    # A signal that is ignored, as SIGHUP under nohup, stays ignored. Only the main thread may
    # set handlers.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, _interrupt)
                    for signum in (signal.SIGTERM, signal.SIGHUP)
                    if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        return args.handler(args, console)
    except LatheError as error:
        # Errors go to stderr, so that `lathe ... > file` keeps only the results.
        ErrorConsole().print(f"error: {error}", style="red", highlight=False, markup=False)
        return 1
    except obstore.exceptions.BaseError as error:
        # The runner names the resource of a failed request, and this covers the rest.
        logging.getLogger(__name__).debug("The command failed.", exc_info=True)
        message = ObjectStoreError("", "", error)
        ErrorConsole().print(f"error: {message}", style="red", highlight=False, markup=False)
        return 1
    except OSError as error:
        # A full disk or a permission problem is the environment's, not a bug: one line, the
        # traceback only with --verbose.
        logging.getLogger(__name__).debug("The command failed.", exc_info=True)
        where = f" ({error.filename})" if error.filename else ""
        ErrorConsole().print(
            f"error: {error.strerror or error}{where}; check free space and permissions there, "
            "then run again.", style="red", highlight=False, markup=False,
        )
        return 1
    except KeyboardInterrupt as interrupt:
        signum = _interrupt_signal(interrupt)
        if signum == signal.SIGPIPE:
            # stdout is gone, so the message goes to stderr, unless that is closed too.
            ErrorConsole().print(
                "Interrupted: standard output was closed (broken pipe), as by `| head`; "
                "finished stages are kept and are reused on the next run.",
                highlight=False, markup=False,
            )
        else:
            console.print("Interrupted; finished stages are kept and are reused on the next run.")
        # The shell convention, 128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM, 141
        # for a closed output, so that a supervisor can tell how lathe was stopped.
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum: int, _frame) -> None:
    if signum == signal.SIGHUP:
        # The terminal is gone, and writing to it fails with EIO. Later output goes nowhere,
        # so that stopping the stages is not cut short by a failed print.
        # Output to a file or a pipe still works, and keeps the lines that follow.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                if os.isatty(stream.fileno()):
                    os.dup2(devnull, stream.fileno())
        os.close(devnull)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _interrupt_signal(interrupt: KeyboardInterrupt) -> int:
    """Return the number of the signal that raised `interrupt`: SIGINT unless `_interrupt` did."""
    name = interrupt.args[0] if interrupt.args else None
    if isinstance(name, str) and name in signal.Signals.__members__:
        return int(signal.Signals[name])
    return int(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
