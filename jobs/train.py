"""Entry point for `ray job submit -- python jobs/train.py ...` (same as `raytumor train`)."""

from raytumor.train import get_args_parser, main

if __name__ == "__main__":
    main(get_args_parser().parse_args())
