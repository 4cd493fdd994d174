"""Entry point for `ray job submit -- python jobs/report.py ...` (same as `raytumor report`)."""

from raytumor.config import parse_args
from raytumor.report import get_args_parser, main

if __name__ == "__main__":
    main(parse_args(get_args_parser()))
