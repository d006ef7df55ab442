"""Start, watch and stop the cluster's processes (the thin I/O layer under ``LocalCluster``).

Each component runs in its own process group with its output in ``logs/NAME.log`` and its pid
in ``pids/NAME.pid``, so ``down`` (even from another shell) can stop exactly what ``up``
started, and never a process that merely reused a recorded pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cheapspot_localcluster.components import Command, Layout


class ClusterError(RuntimeError):
    """Something the user must act on; the message says what and where to look."""


class PortInUseError(ClusterError):
    pass


class ComponentFailedError(ClusterError):
    """A component exited or never became ready; carries the tail of its log."""

    def __init__(self, component: str, reason: str, log: Path) -> None:
        self.component = component
        tail = log_tail(log)
        super().__init__(f"{component} {reason}; last lines of {log}:\n{tail}")


def log_tail(log: Path, lines: int = 25) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "  (no log)"
    return "\n".join("  " + line for line in text.splitlines()[-lines:]) or "  (empty log)"


def check_ports_free(ports: Mapping[str, int], host: str = "127.0.0.1") -> None:
    """Fail at once, naming the component, when a port is taken (instead of a component
    crashing later, or worse, talking to somebody else's server)."""
    busy = []
    for name, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As the servers themselves do: a port whose last connections linger in TIME_WAIT
            # (a cluster just stopped) is free; only a listener makes bind fail.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy.append(f"{port} ({name})")
    if busy:
        raise PortInUseError(
            f"port {', '.join(busy)} already in use on {host}: is another cluster running? "
            "Stop it with `cheapspot down`, or free the port."
        )


def die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec function asking Linux to kill the child when its parent dies.

    Test clusters use it: if the test process is killed, its cluster goes too. The libc
    function is resolved here, in the parent, so the child only makes one call before exec.
    Linux sends the signal when the *thread* that started the child ends, so start such
    children from a thread that outlives them (the main thread, in tests and benchmarks).
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return preexec


def start(
    command: Command, layout: Layout, die_with_parent: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session, output to its log, and record its pid."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    layout.pids.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **command.env}
    with layout.log(command.name).open("ab") as log:
        proc = subprocess.Popen(
            command.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            # Safe here despite threads: the hook makes one pre-resolved libc call, no locks.
            preexec_fn=die_with_parent_hook() if die_with_parent else None,  # noqa: PLW1509
        )
    record = {"pid": proc.pid, "exe": command.argv[0], "name": command.name}
    layout.pid(command.name).write_text(json.dumps(record))
    return proc


def ssl_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def wait_ready(
    command: Command,
    proc: subprocess.Popen[bytes],
    layout: Layout,
    context: ssl.SSLContext | None,
    timeout_s: float,
) -> None:
    """Poll the component's health URL until it answers 200; fail fast if it exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise ComponentFailedError(
                command.name, f"exited with code {code}", layout.log(command.name)
            )
        try:
            with urllib.request.urlopen(command.ready_url, timeout=2, context=context) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, ssl.SSLError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise ComponentFailedError(
        command.name,
        f"not ready after {timeout_s:.0f}s ({command.ready_url}: {last})",
        layout.log(command.name),
    )


def process_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _same_program(pid: int, exe: str) -> bool:
    """Guard against pid reuse: only signal a process still running the recorded program."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc (macOS): trust the pid file
    return argv0 == exe


def recorded(layout: Layout) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    if not layout.pids.is_dir():
        return out
    for path in sorted(layout.pids.glob("*.pid")):
        with contextlib.suppress(OSError, ValueError):
            out[path.stem] = json.loads(path.read_text())
    return out


def running_pids(layout: Layout) -> dict[str, int]:
    """Components whose recorded process is still alive."""
    alive = {}
    for name, rec in recorded(layout).items():
        pid = int(str(rec["pid"]))
        if process_alive(pid) and _same_program(pid, str(rec["exe"])):
            alive[name] = pid
    return alive


def stop(
    layout: Layout,
    order: Sequence[str],
    children: Mapping[str, subprocess.Popen[bytes]] | None = None,
    grace_s: float = 10.0,
    only: bool = False,
) -> None:
    """Stop every recorded component, ``order`` first (then any other pid file, unless
    ``only``), each process group with SIGTERM and, after ``grace_s``, SIGKILL. Reaps our own
    children."""
    records = recorded(layout)
    names = [n for n in order if n in records]
    if not only:
        names += [n for n in records if n not in order]
    for name in names:
        rec = records[name]
        pid = int(str(rec["pid"]))
        if process_alive(pid) and _same_program(pid, str(rec["exe"])):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            child = (children or {}).get(name)
            while time.monotonic() < deadline:
                if child is not None:
                    child.poll()  # reap, or the zombie looks alive
                if not process_alive(pid):
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        child = (children or {}).get(name)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        # The group may hold helpers the leader started; make sure none outlives it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        layout.pid(name).unlink(missing_ok=True)
