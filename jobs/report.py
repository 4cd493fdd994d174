"""Entry point for `ray job submit -- python jobs/report.py ...` (same as `raytumor report`)."""

import sys

from raytumor.cli import run

if __name__ == "__main__":
    sys.exit(run(["report", *sys.argv[1:]]))
