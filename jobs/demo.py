"""Entry point for `ray job submit -- python jobs/demo.py ...` (same as `raytumor demo`)."""

from raytumor.config import parse_args
from raytumor.demo import get_args_parser, main

if __name__ == "__main__":
    main(parse_args(get_args_parser()))
