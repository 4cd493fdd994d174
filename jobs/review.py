"""Entry point for `python jobs/review.py OUTPUT ...` (same as `raytumor review`)."""

import sys

from raytumor.cli import run

if __name__ == "__main__":
    sys.exit(run(["review", *sys.argv[1:]]))
