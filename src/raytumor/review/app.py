"""The review page's ASGI app (Starlette): the page and its static files, a JSON API over the rows, the
pictures of one row, and verdicts.

    GET  /                              the page (no CDN: everything it needs is in ``static/``)
    GET  /api/summary                   run, bundle, facets for the filter menus, verdict names
    GET  /api/rows?q=&label=&...        {total, ids (all matching, in order), rows (one page)}
    GET  /api/rows/{id}                 the whole score row and its verdict history
    GET  /api/rows/{id}/thumb.png       small picture of the scored slice
    GET  /api/rows/{id}/image.png       the scan as the model saw it (``?slice=`` a volume's other slices)
    GET  /api/rows/{id}/overlay.png     its Grad-CAM overlay (same ``?slice=``)
    GET  /api/rows/{id}/curve.json      a volume's per-slice scores; recomputed vs stored score
    POST /api/rows/{id}/review          {verdict, note, reviewer} appended to OUTPUT/reviews.csv
    GET  /healthz

Safety: loopback unless ``--token-file``; with a token every request carries it (``Authorization: Bearer``,
or the cookie ``/?token=...`` sets once). Without a token the Host header must be the loopback address
(another site's page cannot reach the server through DNS rebinding), and a POST must be JSON from the page's
own origin (no cross-site form posts). Nothing from a request is logged.
"""

from __future__ import annotations

import hmac
import json
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from raytumor.review.scans import ScanViewer, Unavailable
from raytumor.review.store import VERDICTS, Query, ReviewStore

STATIC = {"review.js": "text/javascript", "review.css": "text/css", "index.html": "text/html"}
COOKIE = "raytumor_review"
NO_STORE = {"Cache-Control": "no-store"}


def _static(name: str) -> bytes:
    return resources.files("raytumor.review").joinpath("static", name).read_bytes()


class Guard:
    """ASGI middleware: the token, the Host header and same-origin POSTs (see the module doc)."""

    def __init__(self, app: Any, token: str | None, hosts: set[str]) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        req = Request(scope)
        refusal = self._refusal(req)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def _refusal(self, req: Request) -> Response | None:
        host = req.headers.get("host", "")
        if self.token is None and host not in self.hosts:
            return PlainTextResponse("unknown Host header", status_code=421)
        if req.method == "POST":
            origin = req.headers.get("origin")
            if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
                return PlainTextResponse("cross-origin request refused", status_code=403)
            if not req.headers.get("content-type", "").startswith("application/json"):
                return PlainTextResponse("expected application/json", status_code=415)
        if self.token is None or req.url.path == "/healthz":
            return None
        given = req.query_params.get("token") if req.url.path == "/" else None
        if given is not None:
            if not hmac.compare_digest(given, self.token):
                return PlainTextResponse("bad token", status_code=401)
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            return resp
        auth = req.headers.get("authorization", "")
        bearer = auth[7:] if auth.lower().startswith("bearer ") else None
        cookie = req.cookies.get(COOKIE)
        if any(t is not None and hmac.compare_digest(t, self.token) for t in (bearer, cookie)):
            return None
        return PlainTextResponse("token required: open the address raytumor review printed", status_code=401)


def build_app(
    store: ReviewStore, viewer: ScanViewer, *, reviewer: str, token: str | None = None,
    hosts: set[str] | None = None,
) -> Starlette:  # fmt: skip
    """The page over ``store``; ``reviewer`` is the name verdicts carry unless the page gives another."""

    def row_id(req: Request) -> int:
        rid = int(req.path_params["rid"])
        if not 0 <= rid < len(store.df):
            raise KeyError(rid)
        return rid

    def slice_arg(req: Request) -> int | None:
        s = req.query_params.get("slice")
        return int(s) if s not in (None, "") else None

    def png(make: Any) -> Any:
        def endpoint(req: Request) -> Response:
            try:
                rid = row_id(req)
                return Response(make(rid, req), media_type="image/png", headers={"Cache-Control": "max-age=300"})
            except (KeyError, ValueError):
                return JSONResponse({"error": "no such row or slice"}, status_code=404)
            except Unavailable as e:
                return JSONResponse({"error": str(e)}, status_code=404, headers=NO_STORE)

        return endpoint

    def page(_: Request) -> Response:
        return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=NO_STORE)

    def static(req: Request) -> Response:
        name = req.path_params["name"]
        if name not in STATIC:
            return PlainTextResponse("not found", status_code=404)
        return Response(_static(name), media_type=STATIC[name] + "; charset=utf-8", headers=NO_STORE)

    def summary(_: Request) -> Response:
        run = store.run
        return JSONResponse(
            {
                "output": store.output, "input": run.get("input"), "bundle": viewer.bundle_uri,
                "bundle_id": run.get("bundle_id"), "threshold": run.get("threshold"),
                "classes": store.classes, "negative_class": store.negative_class,
                "verdicts": VERDICTS, "reviewer": reviewer, "facets": store.facets(),
                "reviews_file": store.log.uri,
            },  # fmt: skip
            headers=NO_STORE,
        )

    def rows(req: Request) -> Response:
        try:
            q = Query.from_params(dict(req.query_params))
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        ids = store.select(q)
        page_ids = ids[q.offset : q.offset + q.limit]
        return JSONResponse(
            {"total": int(len(ids)), "offset": q.offset, "ids": ids.tolist(), "rows": store.table_rows(page_ids)},
            headers=NO_STORE,
        )

    def one(req: Request) -> Response:
        try:
            rid = row_id(req)
        except (KeyError, ValueError):
            return JSONResponse({"error": "no such row"}, status_code=404)
        return JSONResponse({"row": store.row(rid), "history": store.history(rid)}, headers=NO_STORE)

    def curve(req: Request) -> Response:
        try:
            return JSONResponse(viewer.curve(row_id(req)), headers=NO_STORE)
        except (KeyError, ValueError):
            return JSONResponse({"error": "no such row"}, status_code=404)
        except Unavailable as e:
            return JSONResponse({"error": str(e)}, status_code=404, headers=NO_STORE)

    async def review(req: Request) -> Response:
        try:
            rid = row_id(req)
            try:
                body = json.loads(await req.body())
            except ValueError:
                raise ValueError("the body must be a JSON object: {verdict, note, reviewer}") from None
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object: {verdict, note, reviewer}")
            fields = {"verdict": "", "note": "", "reviewer": reviewer, **{k: v for k, v in body.items() if v is not None}}
            bad = [k for k in ("verdict", "note", "reviewer") if not isinstance(fields[k], str)]
            if bad or set(body) - {"verdict", "note", "reviewer"}:
                raise ValueError("verdict, note and reviewer are strings, and nothing else is taken")
            # a blank name is no name: the page's own reviewer (--reviewer, else the login name) stands
            who = fields["reviewer"] if fields["reviewer"].strip() else reviewer
            rec = store.record(rid, fields["verdict"], fields["note"], who)
        except KeyError:
            return JSONResponse({"error": "no such row"}, status_code=404)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"record": rec, "row": store.table_rows([rid])[0]}, headers=NO_STORE)

    routes = [
        Route("/", page),
        Route("/static/{name}", static),
        Route("/healthz", lambda _: JSONResponse({"ok": True, "rows": len(store.df)})),
        Route("/favicon.ico", lambda _: Response(b"", status_code=204)),
        Route("/api/summary", summary),
        Route("/api/rows", rows),
        Route("/api/rows/{rid:int}", one),
        Route("/api/rows/{rid:int}/thumb.png", png(lambda rid, req: viewer.thumbnail(rid))),
        Route("/api/rows/{rid:int}/image.png", png(lambda rid, req: viewer.image(rid, slice_arg(req)))),
        Route("/api/rows/{rid:int}/overlay.png", png(lambda rid, req: viewer.overlay(rid, slice_arg(req)))),
        Route("/api/rows/{rid:int}/curve.json", curve),
        Route("/api/rows/{rid:int}/review", review, methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(Guard, token=token, hosts=hosts or set())])
