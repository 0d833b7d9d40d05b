"""One local Prefect API server shared by every stage of a run, started on demand, stopped when idle.

Without a configured ``PREFECT_API_URL`` Prefect starts a temporary server in every process that runs a
flow: about 10 s per stage, and on a fresh machine its first database migration can outlast Prefect's 20 s
start-up limit, which fails the stage. prunekit instead keeps one server per ``PREFECT_HOME``:

* the first stage that needs it starts it (a detached process, so a killed stage does not take it down or
  leave it behind) and waits for as long as that process is alive and starting, never on a fixed timer;
* later stages, and parallel stages of ``dvc queue start --jobs N``, find it through
  ``$PREFECT_HOME/prunekit-server/server.json`` and pay only a health check;
* each stage registers its pid in ``clients/`` while it runs; the server stops itself once no registered
  process is alive and no request came for ``PRUNEKIT_PREFECT_IDLE_S`` seconds (default 300), so nothing
  survives a killed stage for longer than that, and ``prunekit server stop`` stops it at once.

Runs land in ``$PREFECT_HOME``'s database, so a later ``prefect server start`` shows them in the UI. A
``PREFECT_API_URL`` set in the environment or the Prefect profile (your own server, Prefect Cloud, the
tests' server) is always used as it is, and nothing is started.

This module is also the server process's entry point (:func:`serve`), loaded by file path so that the server
does not import prunekit's package (torch, transformers); it must import nothing from prunekit at top level.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("prunekit.pipeline.prefect_server")

IDLE_S = 300.0  # default idle time before the server stops itself (PRUNEKIT_PREFECT_IDLE_S)
START_LIMIT_S = 900.0  # a server still starting after this long is reported as stuck (PRUNEKIT_PREFECT_START_S)


def state_dir(prefect_home: str | os.PathLike[str] | None = None) -> Path:
    """Where the shared server's record, log, lock and client registrations live."""
    home = prefect_home or os.environ.get("PREFECT_HOME") or "~/.prefect"
    return Path(home).expanduser() / "prunekit-server"


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """An exclusive lock on the state folder: starting, joining and stopping never interleave."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against a reused pid), or None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""  # alive, but no /proc here to tell a reused pid apart
    fields = stat.rsplit(")", 1)[1].split()  # the fields after the command name: state is field 3, start time 22
    if fields[0] in ("Z", "X"):
        return None  # exited (a zombie until its parent, e.g. the stage that started the server, reaps it)
    return fields[19]


def _alive(pid: int, started: str | None) -> bool:
    now = _start_time(pid)
    return now is not None and (not started or not now or now == started)


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _record(state: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state / "server.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(state: Path, idle_s: float) -> dict[str, Any]:
    port = int(os.environ.get("PRUNEKIT_PREFECT_PORT") or _free_port())
    # Loaded by path: `-m prunekit...` would import the package and with it torch and transformers.
    code = (
        f"import importlib.util as u; s = u.spec_from_file_location('prunekit_prefect_server', {__file__!r}); "
        f"m = u.module_from_spec(s); s.loader.exec_module(m); m.serve({str(state)!r}, {port}, {idle_s})"
    )
    env = dict(os.environ, PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    with open(state / "server.log", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # not in the stage's process group: a killed stage leaves it running
            close_fds=True,
        )
    record = {"pid": proc.pid, "started": _start_time(proc.pid), "url": f"http://127.0.0.1:{port}/api"}
    (state / "server.json").write_text(json.dumps(record) + "\n")
    log.info("starting a shared Prefect server at %s (log: %s)", record["url"], state / "server.log")
    return record


def _wait_healthy(state: Path, record: dict[str, Any]) -> None:
    """Wait while the server process lives and starts; fail with its log if it dies or is stuck."""
    from prunekit.errors import PrunekitError

    limit = float(os.environ.get("PRUNEKIT_PREFECT_START_S") or START_LIMIT_S)
    start = time.monotonic()
    while not _healthy(record["url"]):
        if not _alive(record["pid"], record.get("started")):
            tail = (state / "server.log").read_text(errors="replace").strip().splitlines()[-8:]
            (state / "server.json").unlink(missing_ok=True)
            raise PrunekitError(
                "the shared Prefect server exited while starting; its log ends with:\n  "
                + "\n  ".join(tail)
                + f"\nSee {state / 'server.log'}, or run your own (prefect server start) and set PREFECT_API_URL."
            )
        if time.monotonic() - start > limit:
            raise PrunekitError(
                f"the shared Prefect server (pid {record['pid']}) has not answered for {limit:.0f} s; see "
                f"{state / 'server.log'}. Stop it with `prunekit server stop`, or raise PRUNEKIT_PREFECT_START_S."
            )
        time.sleep(0.2)
    log.info("shared Prefect server ready at %s after %.1f s", record["url"], time.monotonic() - start)


def _register(state: Path) -> Path:
    clients = state / "clients"
    clients.mkdir(parents=True, exist_ok=True)
    mine = clients / str(os.getpid())
    mine.write_text(_start_time(os.getpid()) or "")
    return mine


def shared_api_url(idle_s: float | None = None) -> tuple[str, Path]:
    """The shared server's API URL, starting the server if none is running, and this process's
    registration (delete it when done; a dead process's registration is ignored anyway)."""
    state = state_dir()
    idle = float(os.environ.get("PRUNEKIT_PREFECT_IDLE_S") or IDLE_S) if idle_s is None else idle_s
    with _locked(state):
        mine = _register(state)  # before the check: a server that sees a live client keeps running
        record = _record(state)
        if record and _alive(record["pid"], record.get("started")) and _healthy(record["url"]):
            return record["url"], mine
        if record and _alive(record["pid"], record.get("started")):
            starting = record  # alive but not answering yet: another stage started it a moment ago
        else:
            starting = _spawn(state, idle)
        _wait_healthy(state, starting)
        return starting["url"], mine


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment or the active Prefect profile, if any."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def stop_server(timeout_s: float = 30.0) -> str | None:
    """Stop the shared server of this ``PREFECT_HOME`` now; returns its URL, or None if none ran."""
    import signal

    state = state_dir()
    with _locked(state):
        record = _record(state)
        (state / "server.json").unlink(missing_ok=True)
    if not record or not _alive(record["pid"], record.get("started")):
        return None
    os.kill(record["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(record["pid"], record.get("started")) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(record["pid"], record.get("started")):
        os.kill(record["pid"], signal.SIGKILL)
    return str(record["url"])


def server_status() -> dict[str, Any] | None:
    """The running shared server's record with its live clients, or None."""
    state = state_dir()
    record = _record(state)
    if not record or not _alive(record["pid"], record.get("started")):
        return None
    return {**record, "clients": _live_clients(state / "clients"), "healthy": _healthy(record["url"])}


def _live_clients(clients: Path) -> list[int]:
    """pids of registered processes still alive; registrations of dead ones are removed."""
    live = []
    for f in clients.glob("*") if clients.is_dir() else []:
        try:
            pid, started = int(f.name), f.read_text().strip()
        except (OSError, ValueError):
            continue
        if _alive(pid, started):
            live.append(pid)
        else:
            f.unlink(missing_ok=True)
    return sorted(live)


def serve(state: str, port: int, idle_s: float) -> None:
    """Run the Prefect API on 127.0.0.1:``port`` until no client is alive and no request came for ``idle_s``."""
    import uvicorn
    from prefect.server.api.server import create_app

    folder = Path(state)
    app = create_app(ephemeral=True, final=True)  # the API and the services flow runs need; no UI
    last = [time.monotonic()]

    async def touched(scope: Any, receive: Any, send: Any) -> None:
        last[0] = time.monotonic()
        await app(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(touched, host="127.0.0.1", port=port, log_level="error", lifespan="on"))

    def watchdog() -> None:
        while not server.should_exit:
            time.sleep(1.0)
            with _locked(folder):
                if _live_clients(folder / "clients") or time.monotonic() - last[0] < idle_s:
                    continue
                record = _record(folder)
                if record and record.get("pid") == os.getpid():
                    (folder / "server.json").unlink(missing_ok=True)  # new clients start a new server
                server.should_exit = True

    threading.Thread(target=watchdog, daemon=True).start()
    server.run()
