"""Serve a finished ModelDeployment from a local tritonserver and send it a sample request.

The local backend's half of a ModelDeployment's serving plan: the export stage wrote a Triton
model repository, and this module starts the `tritonserver` binary from the `nvidia-pytriton`
wheel on 127.0.0.1 with it, as the Kubernetes backend starts Triton in a Deployment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from lathe import plans
from lathe.errors import InvalidResourceError, LatheError
from lathe.local.runner import StageResult, record_serving
from lathe_trainer import remote
from lathe_trainer.serving import client, local_server, reference
from lathe_trainer.stage import local_path
from lathe_trainer.training import storage

log = logging.getLogger(__name__)


class ServingStoppedError(InvalidResourceError):
    """The local tritonserver exited on its own while `lathe run --serve` kept it serving."""


class ServingStartError(LatheError):
    """The local tritonserver of a ModelDeployment did not start or did not become ready."""


def repository_path(result: StageResult) -> Path:
    """Return the local model repository, downloaded once per export digest when the export
    wrote it to S3, because Triton reads it from disk."""
    uri = plans.serving(result.resource, result.output_uri).repository_uri
    if not storage.is_remote(uri):
        return local_path(uri)
    return _local_copy(uri, result.directory / "triton", result.manifest["digest"])


def fine_tuned_model_dir(result: StageResult) -> Path:
    """Return the FineTune model directory the export started from, for the reference result.

    A model on S3 is downloaded into the workspace, once per FineTune digest, so that the
    reference of a rerun FineTune with the same URI is never its older model.
    """
    model_input = result.manifest["inputs"]["model"]
    uri = model_input["uri"].rstrip("/") + "/model"
    if not storage.is_remote(uri):
        return local_path(uri)
    return _local_copy(uri, result.directory / "reference", model_input["digest"])


def _local_copy(uri: str, parent: Path, digest: str) -> Path:
    """Download the tree at `uri` into a folder of `parent` named by `digest`, once."""
    target = parent / digest.removeprefix("sha256:")[:16]
    remote.download_once(uri, target)
    return target


def in_process_answer(result: StageResult, text: str) -> list[dict[str, Any]]:
    return reference.predict_entities(fine_tuned_model_dir(result), [text])[0]


def curl_command(http_url: str, model_name: str, text: str = "Your sentence here.") -> str:
    """Return a curl command that sends `text` to the served ensemble.

    The body is Triton's KServe v2 inference request, with one UTF-8 text per row of TEXT.
    """
    body = json.dumps({"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES",
                                   "data": [text]}]})
    return f"curl -s http://{http_url}/v2/models/{model_name}/infer -d {shlex.quote(body)}"


def serve_and_query(
    result: StageResult, text: str, console: Console, keep_serving: bool = False
) -> list[dict[str, Any]]:
    """Start Triton on the deployment's repository; print its endpoint and `text`'s entities.

    status.json shows Ready while Triton serves, and Ready False again once it stops.
    """
    with _serving(result, console, keep_serving) as server:
        entities = _query(result, server, text, console, keep_serving)
        if keep_serving:
            _serve_until_interrupted([(result, server)], console)
        return entities


def serve_all(
    results: list[StageResult], text: str, console: Console, keep_serving: bool = False
) -> None:
    """Send `text` to each deployment's Triton, one deployment after the other. With
    `keep_serving`, every deployment's Triton keeps running until one interrupt stops all."""
    if not keep_serving:
        for result in results:
            serve_and_query(result, text, console)
        return
    with contextlib.ExitStack() as stack:
        servers = []
        for result in results:
            server = stack.enter_context(_serving(result, console, keep_serving))
            _query(result, server, text, console, keep_serving)
            servers.append((result, server))
        _serve_until_interrupted(servers, console)


@contextlib.contextmanager
def _serving(
    result: StageResult, console: Console, keep_serving: bool
) -> Iterator[local_server.TritonServer]:
    """Run Triton on the deployment's repository while the context lasts, and record in
    status.json whether it serves."""
    workdir = result.directory / "triton"
    serving = result.resource.spec.serving
    # --serve keeps Triton up for clients, so it listens on the ports of the spec, as the
    # Service does in a cluster, when they are free. The sample request alone takes any ports.
    ports = ((serving.http_port, serving.grpc_port, serving.metrics_port) if keep_serving
             else None)
    busy = local_server.busy_ports(ports) if ports else []
    try:
        started = local_server.start_triton(repository_path(result), workdir, ports=ports)
    except local_server.TritonStartError as error:
        record_serving(result, None, f"Triton did not start: {error}")
        raise ServingStartError(
            f"{result.resource.key}: the local tritonserver did not start: {error}"
        ) from error
    with started as server:
        chosen = (server.http_port, server.grpc_port, server.metrics_port)
        if ports and chosen != ports:
            # Without a busy port before the start, one was taken while Triton started.
            if len(busy) == 1:
                cause = f"Port {busy[0]} of spec.serving is in use"
            elif busy:
                cause = f"Ports {', '.join(map(str, busy))} of spec.serving are in use"
            else:
                cause = "A port of spec.serving was taken while Triton started"
            console.print(f"{cause}, so Triton listens on HTTP port {server.http_port}, gRPC "
                          f"port {server.grpc_port} and metrics port {server.metrics_port} "
                          "instead.")
        record_serving(result, f"http://{server.http_url}")
        try:
            yield server
        finally:
            # A server that exited on its own was recorded with the reason when it was found.
            if server.process.poll() is None:
                record_serving(result, None)


def _query(result: StageResult, server: local_server.TritonServer, text: str,
           console: Console, keep_serving: bool) -> list[dict[str, Any]]:
    model_name = result.resource.spec.model_name
    entities = client.infer_entities(server.http_url, model_name, [text])[0]
    console.print(f"Triton is serving model {model_name!r} at http://{server.http_url} "
                  f"(gRPC {server.grpc_url}, metrics {server.metrics_url}).")
    console.print(f"Sample: {text}")
    if entities:
        for entity in entities:
            console.print(f"  {entity['label']:<10} {entity['text']!r} "
                          f"[{entity['start']}:{entity['end']}]")
    else:
        console.print("  (no entities found)")
    if not keep_serving:
        console.print("Triton stops now; run with --serve to keep it running.")
        return entities
    console.print("Send a request with:")
    console.print(f"  {curl_command(server.http_url, model_name)}")
    return entities


def _serve_until_interrupted(
    servers: list[tuple[StageResult, local_server.TritonServer]], console: Console
) -> None:
    """Wait for Ctrl-C or `kill`, or raise ServingStoppedError when a server exits first."""
    # The message is inside the try, because a client that waits for it may interrupt at once,
    # and the message promises status 0 from then on.
    try:
        console.print("Serving until interrupted (Ctrl-C or kill; either exits with status 0).")
        while True:
            for result, server in servers:
                if server.process.poll() is not None:
                    _raise_stopped(result, server)
            time.sleep(1)
    except KeyboardInterrupt as interrupt:
        # A closed standard output (lathe.cli.OutputConsole) is no request to stop serving
        # from the user, so lathe exits with 141 for it, not with the status 0 promised here.
        if interrupt.args == (signal.Signals.SIGPIPE.name,):
            raise
        # An output closed while Triton served, which lathe notices only at this write, does
        # not turn the requested stop into a failure.
        with contextlib.suppress(KeyboardInterrupt):
            console.print("Stopping Triton.")


def _raise_stopped(result: StageResult, server: local_server.TritonServer) -> NoReturn:
    """Record in status.json that `server` exited while serving, and raise the error."""
    error = ServingStoppedError(
        result.resource.key, "--serve",
        f"tritonserver exited with code {server.process.returncode} while serving; its log "
        f"is {server.log_path}, and its last lines are:\n{server.log_tail(10)}",
    )
    record_serving(result, None, f"Triton stopped while serving: {error.detail}")
    raise error
