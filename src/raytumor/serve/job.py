"""``raytumor serve``: one scan at a time over HTTP, on Ray Serve, with the batch scorer's own predictor.

    POST /v1/score[?name=...]   one file (raw body, or multipart field ``file``): the score row, as JSON
    GET  /v1/model              the bundle card (backbone, classes, threshold, scope, metrics, versions)
    GET  /healthz               ok, and which bundle answers

A replica decodes each request with :func:`raytumor.score.decode.decoded_row` and scores it with
:meth:`raytumor.score.actors.ScorePredictor.score_rows`, the two functions batch scoring runs: the same
columns, scope/view/OOD fields and error reasons, so the endpoint and ``raytumor score`` cannot disagree.
Concurrent requests are batched (``@serve.batch``) into one forward pass. A scan that cannot be scored
is a 422 with its row (``error`` says why); a non-finite score is an error, never a label.

Safety: binds 127.0.0.1 unless told otherwise, and any other address needs ``--token-file`` (requests
then carry ``Authorization: Bearer <token>``); bodies over ``--max-request-bytes`` get 413 before they
are read; each request has a deadline (504). Nothing from a request (headers, names, contents) is logged.
"""

from __future__ import annotations

import argparse
import signal
import time
from dataclasses import asdict
from typing import Any

from raytumor.bundle import validate_bundle
from raytumor.config import from_args, stage_parser
from raytumor.runtime import init_ray, predictor_resources
from raytumor.serve.config import ServeConfig
from raytumor.storage import StorageOptions


def build_app(cfg: ServeConfig, num_replicas: int | None = None) -> Any:
    """The Serve application (bind it with ``serve.run``); replicas sized like the scoring actors."""
    from ray import serve

    from raytumor.serve.endpoint import ScoreEndpoint

    r = predictor_resources()
    replicas = cfg.replicas or num_replicas or max(1, int(r["size"]))
    deployment = serve.deployment(
        ScoreEndpoint,
        name="raytumor",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": r["num_cpus"], "num_gpus": r["num_gpus"], **r.get("remote_args", {})},
        max_ongoing_requests=4 * cfg.max_batch_size,
    )
    return deployment.bind(asdict(cfg), cfg.token(), r["threads"])


def app(args: dict[str, Any]) -> Any:
    """Application builder for a Serve config file (``import_path: raytumor.serve.job:app``; ``args`` are
    ServeConfig fields). The proxy binds what the file's ``http_options`` say, so ``host`` defaults to
    0.0.0.0 here: a token is required unless ``args`` says ``host: 127.0.0.1``."""
    return build_app(ServeConfig(**{"host": "0.0.0.0", **args}))


def serve_bundle(cfg: ServeConfig, blocking: bool = True) -> Any:
    """Validate the bundle, start Ray (and Serve's HTTP proxy on ``cfg.host:cfg.port``), deploy; block until
    Ctrl-C with ``blocking``. Returns the deployment handle."""
    from ray import serve

    validate_bundle(cfg.bundle, StorageOptions.from_env(cfg.s3_endpoint))
    init_ray()
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        handle = serve.run(build_app(cfg), name="raytumor", route_prefix="/", blocking=False)
        print(
            f"[serve] {cfg.bundle} on http://{cfg.host}:{cfg.port}/v1/score (GET /v1/model, /healthz)",
            flush=True,
        )
        if not blocking:
            return handle
        # Ray's core worker takes over SIGINT/SIGTERM at the C level while it starts: hand both back to
        # Python so Ctrl-C (and `kill`) reach the shutdown below.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while True:
            # Short sleeps: a Ctrl-C that the kernel hands to one of Ray's threads only sets Python's flag,
            # which the main thread sees when it wakes (a long sleep ignored it for that long).
            time.sleep(0.5)
    except KeyboardInterrupt:
        # A second Ctrl-C (or a wrapper forwarding the first one again) must not cut the shutdown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("[serve] stopping: replicas and the HTTP proxy shut down", flush=True)
        serve.shutdown()
        raise SystemExit(130) from None


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return stage_parser(ServeConfig, "Serve a bundle over HTTP on Ray Serve: one scan per request", add_help)


def main(args: argparse.Namespace) -> None:
    serve_bundle(from_args(ServeConfig, args))
