"""Entry point for `ray job submit -- python jobs/score.py ...` (same as `raytumor score`)."""

from raytumor.score import get_args_parser, main

if __name__ == "__main__":
    main(get_args_parser().parse_args())
