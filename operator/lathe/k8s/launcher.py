"""The shell script that starts a stage inside a training pod.

`builders_training.training_job` runs it as `sh -c LAUNCHER lathe-launch <module args>`, where
the module args are `lathe_trainer STAGE --config /etc/lathe/config.json [--resume]`. The script
reads the rest from the environment the Job sets:

- No `RDZV_ENDPOINT`: a single-process stage (corpus, tokenizer, export) runs as
  `python -m lathe_trainer ...`.
- `RDZV_ENDPOINT` set: a distributed stage. The script waits until the rendezvous host resolves,
  then starts `torchrun` with c10d rendezvous, `NNODES`, `NPROC`, `RDZV_ID` and the node rank from
  `JOB_COMPLETION_INDEX` (set by the Job controller for Indexed Jobs).

Why wait for DNS: the pods of an Indexed Job start in any order, and the headless Service
publishes `<job>-0.<service>` only once pod 0 has an address. A worker that starts first would
otherwise fail its first rendezvous lookup and fail the whole attempt.

Why the permanent-error marker: torchrun exits with 1 whenever a worker fails, whatever the
worker's exit code (seen with torch 2.13: a worker exiting 42 gives torchrun exit code 1). The
Job's podFailurePolicy distinguishes a permanent error (exit code 42) from a retriable one by the
container's exit code, so each worker runs under a small wrapper that creates a marker file when
the stage exits with 42, and the launcher exits with 42 when torchrun failed and the marker exists.

Why the script does not `exec` its command: the container's first process (PID 1) ignores
SIGTERM unless it installs a handler, so a Python stage started as PID 1 would not stop when the
pod is deleted and would hold its GPUs until the grace period ends. The script stays PID 1 and
forwards SIGTERM and SIGINT to its child.
"""

from __future__ import annotations

from lathe_trainer.stage import EXIT_PERMANENT

# `$0` of the script, shown by `ps` and in the script's log lines.
SCRIPT_NAME = "lathe-launch"

# Defaults of the settings the script reads from the environment (LATHE_DNS_TIMEOUT_SECONDS,
# LATHE_DNS_RETRY_SECONDS, LATHE_PERMANENT_MARKER, LATHE_TERMINATION_LOG; LATHE_PYTHON names the
# interpreter, `python` by default). Tests override them.
DNS_TIMEOUT_SECONDS = 300
DNS_RETRY_SECONDS = 2
PERMANENT_MARKER = "/dev/shm/lathe-permanent-error"
TERMINATION_LOG = "/dev/termination-log"

# Runs once per worker process under `torchrun --no-python`. "$@" is the module args.
_WORKER_SCRIPT = (
    '"${LATHE_PYTHON:-python}" -m "$@"; status=$?; '
    '[ "$status" -ne @EXIT_PERMANENT@ ] || : > "$LATHE_PERMANENT_MARKER"; exit "$status"'
)

_TEMPLATE = r"""
log() { echo "$0: $*" >&2; }

# Log the message, leave it as the container's termination message, and exit.
fail() {
    log "$1"
    printf '%s\n' "$1" > "${LATHE_TERMINATION_LOG:-@TERMINATION_LOG@}" 2>/dev/null
    exit "${2:-1}"
}

# Run a command as a child process, forward SIGTERM and SIGINT to it, and return its status.
run_child() {
    # The trap is set before the child starts, so that a signal that arrives in between is
    # not lost: it is recorded, and passed on once the child's PID is known.
    child=
    stopping=
    trap 'stopping=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null' TERM INT
    "$@" &
    child=$!
    [ -z "$stopping" ] || kill -TERM "$child" 2>/dev/null
    wait "$child"
    status=$?
    # A trapped signal interrupts `wait` with a status above 128; wait again for the real one.
    while kill -0 "$child" 2>/dev/null; do
        wait "$child"
        status=$?
    done
    trap - TERM INT
    return "$status"
}

# Wait until the rendezvous host resolves, up to LATHE_DNS_TIMEOUT_SECONDS.
wait_for_rendezvous_host() {
    host=${RDZV_ENDPOINT%:*}
    # A single node hosts its own rendezvous on loopback; there is no name to wait for.
    [ "$host" = 127.0.0.1 ] && return 0
    timeout=${LATHE_DNS_TIMEOUT_SECONDS:-@DNS_TIMEOUT_SECONDS@}
    interval=${LATHE_DNS_RETRY_SECONDS:-@DNS_RETRY_SECONDS@}
    deadline=$(( $(date +%s) + timeout ))
    until getent hosts "$host" > /dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            fail "Timed out after $timeout s waiting for the rendezvous host $host to resolve. \
Check that the headless Service of the Job exists and that cluster DNS answers."
        fi
        log "The rendezvous host $host does not resolve yet; retrying in $interval s."
        sleep "$interval"
    done
    log "The rendezvous host $host resolves; starting torchrun."
}

if [ "$#" -eq 0 ]; then
    fail "No module arguments given; expected: lathe_trainer STAGE --config FILE [--resume]."
fi

if [ -z "${RDZV_ENDPOINT:-}" ]; then
    run_child "${LATHE_PYTHON:-python}" -m "$@"
    exit "$?"
fi

for name in NNODES NPROC RDZV_ID; do
    eval "value=\${$name:-}"
    [ -n "$value" ] || fail "The environment variable $name is not set; the Job must set it."
done

export LATHE_PERMANENT_MARKER="${LATHE_PERMANENT_MARKER:-@PERMANENT_MARKER@}"
rm -f "$LATHE_PERMANENT_MARKER"
wait_for_rendezvous_host

# Index 0 hosts the c10d store. Setting is_host avoids torch's guess, which compares the endpoint
# with this host's names and addresses and can miss when the endpoint is a Service name.
node_rank=${JOB_COMPLETION_INDEX:-0}
if [ "$node_rank" = 0 ]; then is_host=1; else is_host=0; fi

# NB: c10d assigns node ranks itself at rendezvous. torchrun uses --node-rank only with the
# static backend and logs a warning otherwise, so the flag only records the index in the log.
run_child torchrun \
    --nnodes="$NNODES" \
    --nproc-per-node="$NPROC" \
    --node-rank="$node_rank" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$RDZV_ENDPOINT" \
    --rdzv-id="$RDZV_ID" \
    --rdzv-conf="is_host=$is_host" \
    --max-restarts=0 \
    --no-python sh -c '@WORKER_SCRIPT@' lathe-worker "$@"
status=$?
if [ "$status" -ne 0 ] && [ -e "$LATHE_PERMANENT_MARKER" ]; then
    # No termination message here: the worker's own error is in the log, which the kubelet
    # reports (FallbackToLogsOnError) only while the termination message file is empty.
    log "A worker exited with the permanent-error code @EXIT_PERMANENT@; exiting with it."
    exit @EXIT_PERMANENT@
fi
exit "$status"
"""


def _render(template: str) -> str:
    values = {
        "@WORKER_SCRIPT@": _WORKER_SCRIPT,
        "@EXIT_PERMANENT@": str(EXIT_PERMANENT),
        "@DNS_TIMEOUT_SECONDS@": str(DNS_TIMEOUT_SECONDS),
        "@DNS_RETRY_SECONDS@": str(DNS_RETRY_SECONDS),
        "@PERMANENT_MARKER@": PERMANENT_MARKER,
        "@TERMINATION_LOG@": TERMINATION_LOG,
    }
    for token, value in values.items():
        template = template.replace(token, value)
    return template


# The POSIX shell script, with the constants above filled in.
LAUNCHER = _render(_TEMPLATE)


def command(module_args: list[str]) -> list[str]:
    """Return the container command that runs the launcher with the given module args."""
    return ["sh", "-c", LAUNCHER, SCRIPT_NAME, *module_args]
