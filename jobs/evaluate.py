"""Entry point for `ray job submit -- python jobs/evaluate.py ...` (same as `raytumor evaluate`)."""

from raytumor.evaluate import get_args_parser, main

if __name__ == "__main__":
    main(get_args_parser().parse_args())
