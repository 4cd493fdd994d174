"""Entry point for `ray job submit -- python jobs/slices.py ...` (same as `raytumor slices`)."""

import sys

from raytumor.cli import run

if __name__ == "__main__":
    sys.exit(run(["slices", *sys.argv[1:]]))
