"""Run the rebuild job and SIGKILL it at a named phase (what `ray job stop` does after 3 s).

    python -m tests.integration.crash_rebuild PHASE -- <jobs.rebuild_index args>

The kill point is injected through the job's `on_phase` parameter; production code has no crash hook.
"""

import os
import signal
import sys

from jobs import rebuild_index


def main() -> None:
    phase, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: crash_rebuild PHASE -- ARGS"

    def on_phase(name: str) -> None:
        print(f"phase {name}", flush=True)
        if name == phase:
            os.kill(os.getpid(), signal.SIGKILL)

    rebuild_index.main(argv, on_phase=on_phase)
    sys.exit(3)  # the kill point was never reached


if __name__ == "__main__":
    main()
