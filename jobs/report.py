"""Entry point for `ray job submit -- python jobs/report.py ...` (same as `raytumor report`)."""

from raytumor.report import get_args_parser, main

if __name__ == "__main__":
    main(get_args_parser().parse_args())
