"""Entry point for `ray job submit -- python jobs/cv.py ...` (same as `raytumor cv`)."""

from raytumor.config import parse_args
from raytumor.cv import get_args_parser, main

if __name__ == "__main__":
    main(parse_args(get_args_parser()))
