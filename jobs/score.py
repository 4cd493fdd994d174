"""Entry point for `ray job submit -- python jobs/score.py ...` (same as `raytumor score`)."""

from raytumor.config import parse_args
from raytumor.score import get_args_parser, main

if __name__ == "__main__":
    main(parse_args(get_args_parser()))
