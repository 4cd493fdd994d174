"""Entry point for `ray job submit -- python jobs/demo.py ...` (same as `raytumor demo`)."""

import sys

from raytumor.cli import run

if __name__ == "__main__":
    sys.exit(run(["demo", *sys.argv[1:]]))
