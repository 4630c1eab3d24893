"""Entry point: `python -m study <command>`."""

import os
import sys

# PyTorch's OpenMP threads spin while they wait for each other. When other processes share the
# cores (parallel workers, a second study, a test run), a spinning thread burns the time slice
# its partner needs, and a CPU epoch took 5x longer on a busy 2-core machine (52 s against 10 s,
# measured for `bench`). Waiting threads that sleep instead cost little when the cores are free.
# OpenMP reads this once, when torch loads it; a value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from study.cli import main  # noqa: E402 - after the environment above, on purpose

if __name__ == "__main__":
    sys.exit(main())
