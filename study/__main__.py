"""Entry point: `python -m study <command>`."""

import sys

from study.cli import main

if __name__ == "__main__":
    sys.exit(main())
