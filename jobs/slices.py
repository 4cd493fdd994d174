"""Entry point for `ray job submit -- python jobs/slices.py ...` (same as `raytumor slices`)."""

from raytumor.config import parse_args
from raytumor.slices import get_args_parser, main

if __name__ == "__main__":
    main(parse_args(get_args_parser()))
