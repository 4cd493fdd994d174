"""Entry point for `ray job submit -- python jobs/demo.py ...` (same as `raytumor demo`)."""

from raytumor.demo import get_args_parser, main

if __name__ == "__main__":
    main(get_args_parser().parse_args())
