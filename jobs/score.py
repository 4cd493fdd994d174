"""Entry point for `ray job submit -- python jobs/score.py ...` (same as `raytumor score`)."""

import sys

from raytumor.cli import run

if __name__ == "__main__":
    sys.exit(run(["score", *sys.argv[1:]]))
