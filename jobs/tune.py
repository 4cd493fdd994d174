"""Entry point for `ray job submit -- python jobs/tune.py ...` (same as `raytumor tune`)."""

from raytumor.tune import get_args_parser, main

if __name__ == "__main__":
    main(get_args_parser().parse_args())
