"""Entry point for `ray job submit -- python jobs/evaluate.py ...` (same as `raytumor evaluate`)."""

import sys

from raytumor.cli import run

if __name__ == "__main__":
    sys.exit(run(["evaluate", *sys.argv[1:]]))
