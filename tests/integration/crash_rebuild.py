"""Run the rebuild job and SIGKILL it at a named phase (what `ray job stop` does after 3 s).

    python -m tests.integration.crash_rebuild PHASE[#N] -- <jobs.rebuild_index args>

PHASE#N kills at the N-th time the phase is reached (e.g. part_committed#3: after three partitions).

The kill point is injected through the job's `on_phase` parameter; production code has no crash hook.
"""

import os
import signal
import sys

from jobs import rebuild_index


def main() -> None:
    target, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: crash_rebuild PHASE[#N] -- ARGS"
    phase, _, nth = target.partition("#")
    seen = {"n": 0}

    def on_phase(name: str) -> None:
        print(f"phase {name}", flush=True)
        if name == phase:
            seen["n"] += 1
            if seen["n"] == int(nth or 1):
                os.kill(os.getpid(), signal.SIGKILL)

    rebuild_index.main(argv, on_phase=on_phase)
    sys.exit(3)  # the kill point was never reached


if __name__ == "__main__":
    main()
