"""Entry point for `ray job submit -- python jobs/train.py ...` (same as `raytumor train`)."""

import sys

from raytumor.cli import run

if __name__ == "__main__":
    sys.exit(run(["train", *sys.argv[1:]]))
