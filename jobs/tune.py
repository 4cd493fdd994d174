"""Entry point for `ray job submit -- python jobs/tune.py ...` (same as `raytumor tune`)."""

import sys

from raytumor.cli import run

if __name__ == "__main__":
    sys.exit(run(["tune", *sys.argv[1:]]))
