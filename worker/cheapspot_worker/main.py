"""``cheapspot worker``: read the Task, run its role, return the contract's exit code.

The task comes from the ``CHEAPSPOT_TASK`` environment variable (what the operator sets)
or ``--task FILE`` (JSON). Every way out maps to a :class:`cheapspot.contract.ExitCode`:

* DONE: the role finished;
* PERMANENT: a user error (bad task, dataset, model, LoRA settings), with a message that
  says what to change; the job fails and is not retried;
* TRANSIENT: the object store stayed down after retries (nothing published is damaged);
* INTERRUPTED: SIGTERM, after the checkpoint was published.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from cheapspot.contract import TASK_ENV, ExitCode, Layout, Phase, Progress, Role, Task
from cheapspot.store import PermissionStoreError, Store, StoreError, TransientStoreError
from cheapspot_worker.errors import FAILED_EXIT, EngineFailed, Interrupted, PermanentError
from cheapspot_worker.progress import configure_logging, event


def read_task(path: Path | None) -> Task:
    try:
        if path is not None:
            return Task.model_validate_json(path.read_text())
        return Task.from_env()
    except ValidationError as exc:
        raise PermanentError(f"invalid task: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise PermanentError(f"cannot read the task ({TASK_ENV} or --task FILE): {exc}") from exc


def _record_failure(task: Task, message: str) -> None:
    """Best effort: the operator reads the message from the progress record."""
    role = task.role
    try:
        from cheapspot.store import RetryPolicy

        store = Store(task.output_uri, retry=RetryPolicy(attempts=2, base_delay=0.2))
        key = Layout(task.output_uri).progress(role, task.shard_index)
        previous = store.get_json(key) or {}
        record = Progress(
            role=role,
            shard_index=task.shard_index,
            phase=Phase.FAILED,
            round=int(previous.get("round", 0)),
            step=int(previous.get("step", 0)),
            total_steps=int(previous.get("total_steps", 0)),
            resumes=int(previous.get("resumes", 0)),
            steps_lost=int(previous.get("steps_lost", 0)),
            message=message[:2000],
        )
        store.put_bytes(key, record.to_json())
    except (StoreError, OSError, ValueError):
        pass


UNEXPECTED_ERROR = 1
"""Exit code of an error the worker does not know how to classify: a plain failure."""

TERMINATION_MESSAGE_ENV = "CHEAPSPOT_TERMINATION_MESSAGE_PATH"
DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")


def write_termination_message(message: str) -> None:
    """Leave the final error where Kubernetes shows it (``kubectl describe``, the pod's
    ``state.terminated.message``, which the operator turns into the job's reason): the file
    named by ``$CHEAPSPOT_TERMINATION_MESSAGE_PATH`` if set (the local cluster's pod runner),
    else the container's ``/dev/termination-log`` when it is writable. Best effort."""
    configured = os.environ.get(TERMINATION_MESSAGE_ENV)
    path = Path(configured) if configured else DEFAULT_TERMINATION_LOG
    if not configured and not os.access(path, os.W_OK):
        return
    with contextlib.suppress(OSError):
        path.write_text(message[-4000:])  # kubelet keeps at most 4 KiB


def run(task: Task) -> None:
    from cheapspot_worker.errors import Stop

    stop = Stop()
    stop.install()
    store = Store(task.output_uri)
    if task.role is Role.GENERATE:
        from cheapspot_worker.generate import run_generate

        run_generate(task, store, stop)
    elif task.role is Role.TRAIN:
        from cheapspot_worker.training import run_shard

        run_shard(task, store, stop)
    elif task.role is Role.ANCHOR:
        from cheapspot_worker.anchor import run_anchor

        run_anchor(task, store, stop)
    else:
        raise PermanentError(f"role {task.role.value!r} takes a serve task, not a train task")


def task_role(path: Path | None) -> str | None:
    """The ``role`` of the task document, before validating it as a train or serve task."""
    try:
        raw = path.read_text() if path is not None else os.environ.get(TASK_ENV, "")
        doc = json.loads(raw)
    except (OSError, ValueError):
        return None
    role = doc.get("role") if isinstance(doc, dict) else None
    return role if isinstance(role, str) else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cheapspot worker", description=__doc__)
    parser.add_argument("--task", type=Path, help=f"task JSON file (default: ${TASK_ENV})")
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_list)
    configure_logging()
    if task_role(args.task) == Role.SERVE.value:
        return serve_main(args.task, args_list)
    task: Task | None = None
    try:
        task = read_task(args.task)
        event(
            "start",
            role=task.role.value,
            job=f"{task.job.namespace}/{task.job.name}",
            shard=task.shard_index,
            attempt=task.attempt,
        )
        if task.role is Role.GENERATE:
            from cheapspot_worker.generate import enter_generate_env

            enter_generate_env(args_list)  # vLLM's environment: may re-execute this command
        run(task)
    except PermanentError as exc:
        event("failed", logging.ERROR, kind="permanent", error=str(exc))
        write_termination_message(str(exc))
        if task is not None:
            _record_failure(task, str(exc))
        return ExitCode.PERMANENT
    except PermissionStoreError as exc:
        event("failed", logging.ERROR, kind="permanent", error=str(exc))
        write_termination_message(str(exc))
        return ExitCode.PERMANENT
    except Interrupted as exc:
        event("interrupted", reason=str(exc))
        return ExitCode.INTERRUPTED
    except (TransientStoreError, StoreError) as exc:
        event("failed", logging.ERROR, kind="transient", error=str(exc))
        write_termination_message(str(exc))
        return ExitCode.TRANSIENT
    except Exception as exc:
        if _is_out_of_memory(exc):
            message = (
                f"out of memory ({exc}); lower training.batchSize or training.maxSeqLength, "
                "raise training.gradientAccumulation, or use a larger GPU"
            )
            event("failed", logging.ERROR, kind="permanent", error=message)
            write_termination_message(message)
            if task is not None:
                _record_failure(task, message)
            return ExitCode.PERMANENT
        # Not known to be transient: an ordinary failure, retried within maxRestarts (exit
        # 75 would be retried without spending it, for a long time, which a bug does not earn).
        logging.getLogger("cheapspot_worker").exception(
            "unexpected error", extra={"event": "failed", "kind": "error"}
        )
        write_termination_message(f"unexpected error: {type(exc).__name__}: {exc}")
        return UNEXPECTED_ERROR
    event("done", role=task.role.value)
    return ExitCode.DONE


def serve_main(path: Path | None, argv: list[str]) -> int:
    """The serve role: run the replica launcher (in the serving environment, switching to it
    first when this one has no vLLM); its exit code by the contract."""
    from cheapspot.contract import ServeTask

    pool = ""
    try:
        try:
            task = (
                ServeTask.model_validate_json(path.read_text())
                if path is not None
                else ServeTask.from_env()
            )
        except (ValidationError, OSError, ValueError) as exc:
            raise PermanentError(f"invalid serve task: {exc}") from exc
        pool = f"{task.pool.namespace}/{task.pool.name}"
        from cheapspot_worker import serving

        if not serving.has_vllm():
            serving.reexec_in_serve_env(argv)
        event("start", role="serve", pool=pool, replica=task.replica_index, attempt=task.attempt)
        serving.run_serve(task)
    except PermanentError as exc:
        event("failed", logging.ERROR, kind="permanent", error=str(exc), pool=pool)
        write_termination_message(str(exc))
        return ExitCode.PERMANENT
    except Interrupted as exc:
        event("interrupted", reason=str(exc))
        return ExitCode.INTERRUPTED
    except EngineFailed as exc:
        event("failed", logging.ERROR, kind="failed", error=str(exc), pool=pool)
        write_termination_message(str(exc))
        return FAILED_EXIT
    except StoreError as exc:
        kind = "permanent" if isinstance(exc, PermissionStoreError) else "transient"
        event("failed", logging.ERROR, kind=kind, error=str(exc))
        write_termination_message(str(exc))
        return ExitCode.PERMANENT if kind == "permanent" else ExitCode.TRANSIENT
    except Exception as exc:
        logging.getLogger("cheapspot_worker").exception(
            "unexpected error", extra={"event": "failed", "kind": "transient"}
        )
        write_termination_message(f"{type(exc).__name__}: {exc}")
        return ExitCode.TRANSIENT
    return ExitCode.DONE


def _is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)
