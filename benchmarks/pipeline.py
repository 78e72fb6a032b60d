"""Time each stage of the default PubMed example, end to end, from an empty workspace.

Usage: `python benchmarks/pipeline.py [--examples examples/pubmed] [--data-dir ../shared/data]`
(`make bench` runs it). It runs every stage in a fresh temporary workspace, so nothing is reused,
then starts Triton and sends one request, and writes the table between the markers in
docs/benchmarks.md. The target is the whole example in 10 minutes or less on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import time
from pathlib import Path

from rich.console import Console

from lathe import loader
from lathe.api import ModelDeployment
from lathe.cli import DEFAULT_SAMPLE
from lathe.local import serving
from lathe.local.runner import LocalRunner

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
BEGIN = "<!-- pipeline:begin -->"
END = "<!-- pipeline:end -->"
TARGET_SECONDS = 600


def run(examples: Path, data_dir: Path) -> list[tuple[str, float, str]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="lathe-bench-") as workspace:
        runner = LocalRunner(Path(workspace), data_dir)
        resources = runner.check(loader.load_paths([examples]))
        results = runner.run(resources)
        for result in results.values():
            metrics = result.manifest.get("metrics", {})
            rows.append((f"{result.resource.kind} {result.resource.metadata.name}",
                         result.seconds, _headline(metrics)))
        for result in results.values():
            if isinstance(result.resource, ModelDeployment):
                started = time.monotonic()
                answer = serving.serve_and_query(
                    result, DEFAULT_SAMPLE, Console(quiet=True),
                    keep_serving=False,
                )
                rows.append(("Triton start and first answer", time.monotonic() - started,
                             f"{len(answer)} entities"))
    return rows


def _headline(metrics: dict) -> str:
    keys = ("documentsOut", "fertility", "validationPerplexity", "f1", "f1GainFromPretraining",
            "maxAbsDiff")
    parts = [f"{key} {metrics[key]:.4g}" if isinstance(metrics[key], float)
             else f"{key} {metrics[key]}" for key in keys if key in metrics]
    return ", ".join(parts)


def table(rows: list[tuple[str, float, str]]) -> str:
    total = sum(seconds for _, seconds, _ in rows)
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}.",
        "",
        "| stage | seconds | outcome |",
        "|---|---:|---|",
        *[f"| {name} | {seconds:.1f} | {outcome} |" for name, seconds, outcome in rows],
        f"| **total** | **{total:.1f}** | target {TARGET_SECONDS} s: "
        f"{'met' if total <= TARGET_SECONDS else 'missed'} |",
    ]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    document = DOC.read_text() if DOC.is_file() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in document:
        document += f"\n{BEGIN}\n{END}\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    DOC.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", document))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, default=REPO / "examples" / "pubmed")
    parser.add_argument(
        "--data-dir", type=Path,
        default=Path(os.environ.get("LATHE_DATA_DIR", REPO.parent / "shared" / "data")),
    )
    args = parser.parse_args()
    text = table(run(args.examples, args.data_dir))
    print(text)
    write_doc(text)


if __name__ == "__main__":
    main()
