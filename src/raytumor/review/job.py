"""``raytumor review OUTPUT``: the review page over a finished score output, or ``--export`` its verdicts.

Why a small ASGI server (Starlette under uvicorn, both already installed with Ray Serve) and not the Serve
app: reviewing is one person at a time over a finished folder; it starts in about a second on a laptop
without a Ray cluster, adds no Ray session next to the jobs already running on the workstation (sessions on
one host interfere), and needs the model only for the one scan on screen.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import webbrowser
from dataclasses import dataclass
from typing import Any

from raytumor.config import check_bind, from_args, opt, read_token, stage_parser
from raytumor.review.app import build_app
from raytumor.review.export import export_corrections
from raytumor.review.scans import ScanViewer
from raytumor.review.store import ReviewStore
from raytumor.storage import StorageOptions


def _default_reviewer() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers)
        return "reviewer"


@dataclass
class ReviewConfig:
    output: str = opt(help="a finished raytumor score output (folder or s3://|gs:// prefix)", cli=False)
    bundle: str | None = opt(None, "the bundle that scored it (default: the one run.json names)")
    host: str = opt("127.0.0.1", "address to bind; anything but loopback needs --token-file")
    port: int = opt(8765, "HTTP port (0: any free port)")
    token_file: str | None = opt(None, "file holding the token the page must carry (needed off loopback)")
    reviewer: str | None = opt(None, "name verdicts are recorded under (default: your login name)")
    export: str | None = opt(
        None, "write the reviewed rows as a training manifest (path,label,source,patient_id) here, then exit"
    )
    open_browser: bool = opt(True, "only print the page's address; do not open a browser", flag="--no-browser")
    s3_endpoint: str | None = opt(None)

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("give the score output to review: raytumor review OUTPUT")
        check_bind(self.host, self.token_file)


def open_review(cfg: ReviewConfig) -> tuple[ReviewStore, ScanViewer, StorageOptions]:
    storage = StorageOptions.from_env(cfg.s3_endpoint)
    store = ReviewStore(cfg.output, storage)
    viewer = ScanViewer(store, cfg.bundle, storage)
    try:  # the bundle's own negative class beats guessing it from the class names
        neg = viewer.meta().negative_class
        if neg in store.classes and neg != store.negative_class:
            store.set_negative_class(neg)
    except Exception as e:
        print(f"[review] {e}: pictures and overlays are not available", file=sys.stderr, flush=True)
    return store, viewer, storage


def hosts_for(host: str, port: int) -> set[str]:
    """Host header values a loopback page is reached under."""
    names = {host, "127.0.0.1", "localhost", "[::1]"} if host in ("127.0.0.1", "localhost", "::1") else {host}
    return {f"{n}:{port}" for n in names} | ({f"[{host}]:{port}"} if ":" in host else set())


def serve_review(cfg: ReviewConfig, ready: Any = None) -> None:
    """Serve the page until Ctrl-C; ``ready(url)`` is called once it listens (tests, the browser)."""
    import uvicorn

    store, viewer, _ = open_review(cfg)
    token = read_token(cfg.token_file)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        raise OSError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); try --port 0") from None
    port = sock.getsockname()[1]
    app = build_app(store, viewer, reviewer=cfg.reviewer or _default_reviewer(), token=token,
                    hosts=hosts_for(cfg.host, port))  # fmt: skip
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    f = store.facets()
    print(
        f"[review] {f['total']:,} rows ({f['flagged']:,} flagged, {f['reviewed']:,} reviewed) of {store.output}\n"
        f"[review] verdicts go to {store.log.uri}\n[review] open {url}   (Ctrl-C stops)",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    if ready is not None:
        ready(url)
    elif cfg.open_browser:
        webbrowser.open(url)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = stage_parser(
        ReviewConfig, "Review flagged scans of a score output in a local web page; export verdicts", add_help
    )
    p.add_argument("output", metavar="OUTPUT", help="a finished raytumor score output (folder or s3:// prefix)")
    return p


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    cfg = from_args(ReviewConfig, args)
    if cfg.export:
        store, viewer, storage = open_review(cfg)
        res = export_corrections(store, viewer, cfg.export, storage)
        print(
            f"[review] {res['rows']} reviewed rows -> {res['manifest']} ({json.dumps(res['labels'])}; "
            f"{res['files_written']} pictures written beside it); {len(res['left_out'])} left out",
            flush=True,
        )
        for item in res["left_out"][:20]:
            print(f"[review]   left out {item['path']}: {item['why']}", flush=True)
        return res
    serve_review(cfg)
    return None
