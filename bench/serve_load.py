"""Load test of ``raytumor serve`` on loopback, against batch scoring of the same files on the same machine.

For each concurrency (default 1, 8, 32) a fixed number of requests (default 2,000) is sent by that many
client threads, each with its own keep-alive connection, every request one real scan from
../shared/data/br35h-3000 (cycled) as a raw body. Measured:

- throughput (requests/s), p50/p95/p99 latency, error count
- throughput at the best concurrency / ``raytumor score`` images/s on as many inputs (the same files
  cycled), in the same Ray session right after (start-up included, as a user sees it)  target >= 0.7 on CPU
- a replica killed mid-run (``ray.kill`` on one of the deployment's replicas while concurrency 8 runs):
  every request gets a response (200, or an error status with a JSON reason), none hangs or is dropped;
  the endpoint answers again once Serve has replaced the replica

The client threads share the machine with the replicas (2 cores here): the numbers are the endpoint's and
its client's together, as on a workstation; say what else ran.

    python bench/serve_load.py                                   # Lite0 160 px, 2,000 requests per level
    python bench/serve_load.py --requests 300 --concurrency 1,8  # a quick look
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_throughput import DEFAULT_DATA, list_images, make_bundle  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reason(payload: bytes) -> str:
    """An error response's reason: the endpoint's JSON ``error``, or Serve's own text (a dead replica)."""
    try:
        return str(json.loads(payload).get("error", ""))[:80]
    except (ValueError, AttributeError):
        return payload[:80].decode("utf-8", "replace")


def load(port: int, bodies: list[bytes], n: int, concurrency: int, timeout: float = 120.0) -> dict:
    """``n`` POST /v1/score requests from ``concurrency`` threads; per request (status, seconds)."""
    results: list[tuple[int, float, str]] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", f"/v1/score?name=req{i}", body=body)
                r = conn.getresponse()
                payload = r.read()
                status = r.status
                reason = "" if status == 200 else _reason(payload)
            except (OSError, http.client.HTTPException) as e:
                status, reason = -1, f"{type(e).__name__}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            with lock:
                results.append((status, time.perf_counter() - t0, reason))
        conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        for _ in range(concurrency):
            ex.submit(worker)
    wall = time.perf_counter() - t0
    lat = np.array([s for _, s, _ in results])
    errors = [(st, why) for st, _, why in results if st != 200]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "wall_s": round(wall, 2),
        "rps": round(len(results) / wall, 2),
        "p50_ms": round(1000 * float(np.percentile(lat, 50)), 1),
        "p95_ms": round(1000 * float(np.percentile(lat, 95)), 1),
        "p99_ms": round(1000 * float(np.percentile(lat, 99)), 1),
        "errors": len(errors),
        "error_kinds": sorted({f"{st} {why}" for st, why in errors})[:5],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--files", type=int, default=500, help="distinct scans the requests cycle through")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--skip-kill", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import ray
    from ray import serve

    from raytumor.results import read_scores
    from raytumor.runtime import init_ray
    from raytumor.score import ScoreConfig, score
    from raytumor.serve import ServeConfig, build_app

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    bundle = make_bundle(work / "bundle", args.backbone, args.image_size)
    files = list_images(args.data, args.files)
    bodies = [f.read_bytes() for f in files]
    init_ray()
    port = _port()
    cfg = ServeConfig(bundle=str(bundle), port=port, max_batch_size=args.max_batch_size)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="raytumor", route_prefix="/", blocking=False)
    load(port, bodies, 32, 4)  # warm: replicas loaded, first batches compiled
    res: dict = {"backbone": args.backbone, "image_size": args.image_size, "levels": []}
    for c in (int(x) for x in args.concurrency.split(",")):
        r = load(port, bodies, args.requests, c)
        res["levels"].append(r)
        print(json.dumps(r), flush=True)

    if not args.skip_kill:
        # Serve names its replica actors in the "serve" namespace (no State API: it may find another session)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["namespace"] == "serve" and "REPLICA" in a["name"].upper() and "raytumor" in a["name"]]  # fmt: skip
        out: dict = {}

        def kill_one() -> None:
            time.sleep(3.0)
            victim = replicas[0]
            ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=False)
            out["killed"] = victim["name"]

        killer = threading.Thread(target=kill_one)
        killer.start()
        r = load(port, bodies, min(args.requests, 600), 8)
        killer.join()
        time.sleep(5)
        after = load(port, bodies, 40, 4)
        res["kill"] = {"replicas": len(replicas), **out, "during": r, "after": after,
                       "no_request_lost": r["requests"] == min(args.requests, 600)}  # fmt: skip
        print("kill:", json.dumps(res["kill"]), flush=True)
    serve.shutdown()

    out_dir = work / "batch"
    t0 = time.perf_counter()
    # The same work as one load level: as many inputs as requests, the same files cycled under other names.
    score(
        ScoreConfig(bundle=str(bundle), input=str(_subset(files, args.requests, work)), output=str(out_dir))
    )
    batch_s = time.perf_counter() - t0
    n = len(read_scores(str(out_dir), columns=["path"]))
    res["batch_img_s"] = round(n / batch_s, 2)
    best = max(res["levels"], key=lambda x: x["rps"])
    res["best_rps_over_batch"] = round(best["rps"] / res["batch_img_s"], 3)
    print(f"batch scoring {res['batch_img_s']} img/s; best endpoint {best['rps']} req/s at concurrency "
          f"{best['concurrency']}: ratio {res['best_rps_over_batch']} (target >= 0.7)", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


def _subset(files: list[Path], n: int, work: Path) -> Path:
    """A folder of ``n`` inputs cycling through the files the requests used (hard links): batch scoring
    the same inputs as one load level."""
    d = work / "files"
    d.mkdir()
    for i in range(n):
        f = files[i % len(files)]
        (d / f"{i:05d}{f.suffix}").hardlink_to(f)
    return d


if __name__ == "__main__":
    main()
