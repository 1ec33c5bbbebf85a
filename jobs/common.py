"""Entrypoint plumbing shared by the jobs: logging setup, the error-to-exit-code contract, priority."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run `main`; expected failures (bad input, failed checks, a job's own --timeout-s) exit 2 with one
    clear line, not a trace."""
    setup_logging()
    try:
        code = main(argv)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, TimeoutError) as e:
        logging.getLogger("skewless").error("%s: %s", type(e).__name__, e)
        print(f"FAILED: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


def lower_priority(increment: int) -> int:
    """Raise this process's nice value by `increment` (0: leave it) and return the resulting value.
    Linux keeps a nice value per thread and a new thread inherits its creator's: the threads that
    already exist (Ray's own, a thread pool started earlier) are moved too, later ones inherit it."""
    if increment <= 0:
        return os.getpriority(os.PRIO_PROCESS, 0)
    value = os.nice(increment)
    tasks = Path("/proc/self/task")
    for tid in sorted(int(t.name) for t in tasks.iterdir()) if tasks.is_dir() else []:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < value:
                os.setpriority(os.PRIO_PROCESS, tid, value)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    return value
