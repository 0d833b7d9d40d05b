"""What every stage does around its work: logging, typed params, seeding, error exits."""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from prunekit.errors import PrunekitError
from prunekit.pipeline.params import Params, load_params

log = logging.getLogger("prunekit")

# Set by exit_after: the user's one line is printed when the process ends, after Prefect's own exit handlers
# (they drain its event and log queues and may warn while doing so), so that it is the last thing on the terminal.
_last_words: list[str] | None = None


def _refuse(message: str) -> int:
    if _last_words is None:
        log.error("%s", message)
    else:
        _last_words.append(message)
    return 2


def configure_logging() -> None:
    """INFO logs from prunekit, also captured by Prefect flow runs (PREFECT_LOGGING_EXTRA_LOGGERS)."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "prunekit")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # prunekit's loggers also log outside flow runs (argument and params errors): not an API matter.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    logging.getLogger("prunekit").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from params' ``seed``."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _error_names(cls: type[BaseException] = PrunekitError) -> set[str]:
    """The class names of :class:`PrunekitError` and its subclasses (as Prefect's state messages spell them)."""
    names = {cls.__name__}
    for sub in cls.__subclasses__():
        names |= _error_names(sub)
    return names


class _BadInputOnce(logging.Filter):
    """Drop what Prefect's run loggers say about an exception that is bad input.

    A :class:`PrunekitError` is a message for the user, printed once by :func:`run_stage`; Prefect would add
    "Encountered exception during execution" (with a traceback) and "Finished in state Failed(...)" with the same
    message. The flow run still ends Failed with that message in the UI. Other exceptions are bugs and keep all.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, PrunekitError):
            return False
        message = record.getMessage()
        if message.startswith("Finished in state Failed"):
            return not any(f"{name}:" in message or f"{name}(" in message for name in _error_names())
        return True


def quiet_bad_input() -> None:
    """Install the filter on Prefect's run loggers (after Prefect configured its logging)."""
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BadInputOnce) for f in logger.filters):
            logger.addFilter(_BadInputOnce())


HEARTBEAT_ENV = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


def heartbeat_settings() -> dict[Any, Any]:
    """Prefect settings for a stage's flow run: no heartbeats, unless the user configured them.

    A flow run's heartbeat thread sleeps in one-second steps and is joined when the run ends: about 1 s of every
    stage's 2-3 s of Prefect time. Heartbeats only feed an automation that marks silent runs Crashed, which a user
    who wants one sets up (and then sets ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, in the environment or the profile:
    kept as it is). The default (180 s, not set by anyone) is switched off.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings
    from prefect.settings.models.flows import FlowsSettings

    configured = any(os.environ.get(name) for name in HEARTBEAT_ENV)
    default = FlowsSettings.model_fields["heartbeat_frequency"].default
    if configured or get_current_settings().flows.heartbeat_frequency != default:
        return {}
    return {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}


def set_threads(threads: int | None) -> None:
    """``runtime.threads``: torch's intra-op threads for this process (None: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_stage(
    name: str,
    parser: argparse.ArgumentParser,
    body: Callable[..., Any],
    argv: Sequence[str] | None = None,
    check: Callable[[Params, argparse.Namespace], None] | None = None,
) -> int:
    """Parse arguments and the typed params, run ``check(params, arguments)`` when given, then ``body`` as a
    Prefect flow named ``name``; exit code 2 on bad input.

    ``body(params, **arguments)``: the stage's typed function, called with the params and the parsed arguments as
    keywords (their ``dest`` names), the same function a Python caller can import and call. The ``validate`` stage,
    which DVC runs before every other, checks every registry-backed value (``check``); the other stages parse the
    typed params and import only the library code they run, so a code change reruns only the stages that run it.

    The flow reports to the configured Prefect API, or to the shared local server
    (:mod:`prunekit.pipeline.prefect_server`).
    """
    configure_logging()
    parser.add_argument("--params", required=True, help="params file (dvc.yaml passes params.yaml)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        if check is not None:
            check(params, args)
    except PrunekitError as e:
        return _refuse(f"{name}: {e}")
    set_threads(params.runtime.threads)
    start = time.perf_counter()
    timing: dict[str, float] = {}
    registration = None
    try:
        from prefect import flow
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from prunekit.pipeline.prefect_server import configured_api_url, shared_api_url

        quiet_bad_input()

        @flow(name=name, validate_parameters=False)
        def stage_flow(params: Params, arguments: dict[str, Any]) -> Any:
            seed_everything(params.seed)
            t0 = time.perf_counter()
            try:
                return body(params, **arguments)
            finally:
                timing["body"] = time.perf_counter() - t0

        url = configured_api_url()
        if not url:
            url, registration = shared_api_url()
        with temporary_settings({PREFECT_API_URL: url, **heartbeat_settings()}):
            stage_flow(params, {k: v for k, v in vars(args).items() if k != "params"})
    except PrunekitError as e:
        return _refuse(f"{name} failed: {e}")
    finally:
        if registration is not None:
            registration.unlink(missing_ok=True)
    total, work = time.perf_counter() - start, timing["body"]
    log.info("stage %s done in %.1f s (work %.1f s, Prefect %.1f s, peak %s)", name, total, work, total - work,
             peak_memory())  # fmt: skip
    return 0


def peak_memory() -> str:
    """This process's peak resident memory, and the peak GPU memory torch allocated where it used a GPU."""
    import resource
    import sys

    text = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB resident"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
    return text


def exit_after(main: Callable[[], int]) -> NoReturn:
    """Run a stage script's ``main`` and exit with its code, skipping the interpreter's teardown.

    Freeing torch's and transformers' modules at exit costs about 2 s per stage process. The handler is
    registered before ``main`` imports Prefect, so it runs after every other atexit handler (Prefect flushes
    its logs and events in those), prints a refused input's one line last, and only then ends the process. For
    scripts only: a process that runs other code after ``main`` (a test session) must keep its own exit.
    """
    import atexit
    import sys

    global _last_words
    _last_words = []
    code: list[int] = []

    def leave() -> None:
        for message in _last_words or ():
            log.error("%s", message)
        if code:
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(code[0])

    atexit.register(leave)
    code.append(main())
    sys.exit(code[0])
