"""Entry point for `ray job submit -- python jobs/evaluate.py ...` (same as `raytumor evaluate`)."""

from raytumor.config import parse_args
from raytumor.evaluate import get_args_parser, main

if __name__ == "__main__":
    main(parse_args(get_args_parser()))
