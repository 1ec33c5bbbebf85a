"""Entrypoint plumbing shared by the jobs: logging setup and the error-to-exit-code contract."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run `main`; expected failures (bad input, failed checks) exit 2 with one clear line, not a trace."""
    setup_logging()
    try:
        code = main(argv)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        logging.getLogger("skewless").error("%s: %s", type(e).__name__, e)
        print(f"FAILED: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
