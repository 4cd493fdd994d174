"""Entry point for `ray job submit -- python jobs/cv.py ...` (same as `raytumor cv`)."""

import sys

from raytumor.cli import run

if __name__ == "__main__":
    sys.exit(run(["cv", *sys.argv[1:]]))
