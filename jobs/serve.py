"""Entry point for `ray job submit -- python jobs/serve.py ...` (same as `raytumor serve`)."""

import sys

from raytumor.cli import run

if __name__ == "__main__":
    sys.exit(run(["serve", *sys.argv[1:]]))
