"""Entry point for `ray job submit -- python jobs/train.py ...` (same as `raytumor train`)."""

from raytumor.config import parse_args
from raytumor.train import get_args_parser, main

if __name__ == "__main__":
    main(parse_args(get_args_parser()))
