"""``raytumor serve``: one scan at a time over HTTP on Ray Serve, with the batch scorer's own predictor.

Modules: ``config`` (ServeConfig), ``job`` (the application, the CLI), ``endpoint`` (the deployment; imports
Ray Serve, so it is loaded only where it runs).
"""

from __future__ import annotations

from raytumor.serve.config import ServeConfig
from raytumor.serve.job import build_app, get_args_parser, main, serve_bundle

__all__ = ["ServeConfig", "build_app", "get_args_parser", "main", "serve_bundle"]
