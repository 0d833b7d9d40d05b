"""What every stage does around its work: logging, params validation, seeding, error exits."""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.params import Params, load_params

log = logging.getLogger("prunekit")


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


def validated_params(path: str) -> Params:
    """Load params.yaml and check every registry-backed value; fails before any work."""
    from prunekit.config import check_choices

    params = load_params(path)
    check_choices(params)
    return params


def run_stage(
    name: str,
    parser: argparse.ArgumentParser,
    body: Callable[[Params, argparse.Namespace], Any],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse arguments, validate params, run ``body`` as a Prefect flow named ``name``; exit code 2 on bad input."""
    configure_logging()
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        params = validated_params(args.params)
    except PrunekitError as e:
        log.error("%s: %s", name, e)
        return 2
    from prefect import flow

    @flow(name=name, validate_parameters=False)
    def stage_flow(params: Params, args: argparse.Namespace) -> Any:
        seed_everything(params.seed)
        return body(params, args)

    start = time.perf_counter()
    try:
        stage_flow(params, args)
    except PrunekitError as e:
        log.error("%s failed: %s", name, e)
        return 2
    log.info("stage %s done in %.1f s (Prefect start-up included)", name, time.perf_counter() - start)
    return 0
