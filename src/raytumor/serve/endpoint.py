"""The Ray Serve deployment behind ``raytumor serve`` (see :mod:`raytumor.serve.job` for the routes).

A replica decodes each request with :func:`raytumor.score.decode.decoded_row` and scores it with
:meth:`raytumor.score.actors.ScorePredictor.score_rows`, the two functions batch scoring runs: the same
columns, scope/view/OOD fields and error reasons, so the endpoint and ``raytumor score`` cannot disagree.
Concurrent requests are batched (``@serve.batch``) into one forward pass. Nothing from a request (headers,
names, contents) is logged.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
from typing import Any

import numpy as np
from ray import serve

from raytumor.preprocess import PreprocessConfig
from raytumor.results import json_value
from raytumor.score.actors import ScorePredictor
from raytumor.score.decode import columns, decoded_row
from raytumor.serve.config import ServeConfig
from raytumor.storage import StorageOptions


def json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A score row as JSON values: NaN/inf -> null, timestamps -> ISO 8601."""
    return {k: json_value(v) for k, v in row.items()}


class ScoreEndpoint:
    """The Serve deployment: a :class:`ScorePredictor` behind an HTTP ingress (see the module doc)."""

    def __init__(self, cfg: dict[str, Any], token: str | None, num_threads: int | None) -> None:

        self.cfg = ServeConfig(**cfg)
        self.token = token
        self.storage = StorageOptions.from_env(self.cfg.s3_endpoint)
        self.scorer = ScorePredictor(
            self.cfg.bundle, batch_size=self.cfg.max_batch_size, num_threads=num_threads, storage=self.storage,
            min_extent_mm=self.cfg.volume_min_extent_mm, score_out_of_scope=self.cfg.score_out_of_scope,
        )  # fmt: skip
        meta = self.scorer.meta
        self.image_size = meta.image_size
        self.prep = PreprocessConfig.from_dict(meta.preprocess) if meta.preprocess else None
        self.volume_range = (self.cfg.volume_skip_top_mm, self.cfg.volume_depth_mm)
        self._score.set_max_batch_size(self.cfg.max_batch_size)
        self._score.set_batch_wait_timeout_s(self.cfg.batch_wait_ms / 1000)
        self.card = {
            "bundle_id": meta.bundle_id, "backbone": meta.backbone, "classes": meta.classes,
            "negative_class": meta.negative_class, "image_size": meta.image_size, "threshold": meta.threshold,
            "temperature": meta.temperature, "metrics": meta.metrics, "scope": getattr(meta, "scope", None),
            "versions": meta.versions, "created_at": meta.created_at, "research_use_only": True,
        }  # fmt: skip

    def score_files(self, items: list[tuple[str, bytes, bool]]) -> list[dict[str, Any]]:
        """Score rows of (name, bytes, explain) items: batch scoring's decode and predictor, one forward
        pass; with ``explain``, the row's Grad-CAM overlay as a base64 PNG (``explain_png``)."""
        rows = [
            decoded_row(
                name, self.image_size, data, None, self.cfg.min_foreground, self.prep, self.volume_range
            )
            for name, data, _ in items
        ]
        table, pngs = self.scorer.score_batch(columns(rows), np.array([e for _, _, e in items], dtype=bool))
        out = [json_row(r) for r in table.to_pylist()]
        for i, (_, _, explain) in enumerate(items):
            if explain:
                out[i]["explain_png"] = base64.b64encode(pngs[i]).decode() if i in pngs else None
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score(self, items: list[tuple[str, bytes, bool]]) -> list[dict[str, Any]]:
        # the forward pass off the event loop: requests keep arriving (and filling the next batch) meanwhile
        return await asyncio.get_running_loop().run_in_executor(None, self.score_files, items)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        path, method = request.url.path.rstrip("/") or "/", request.method
        if path == "/healthz" and method == "GET":
            return JSONResponse({"status": "ok", "bundle_id": self.card["bundle_id"]})
        if not self._authorised(request):
            return JSONResponse(
                {"error": "unauthorised: send Authorization: Bearer <token>"}, status_code=401
            )
        if path == "/v1/model" and method == "GET":
            return JSONResponse(self.card)
        if path == "/v1/score" and method == "POST":
            return await self._post_score(request)
        return JSONResponse({"error": f"no route {method} {path}"}, status_code=404)

    def _authorised(self, request: Any) -> bool:
        if self.token is None:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip(), self.token)

    async def _post_score(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return JSONResponse({"error": f"request too large: over {limit} bytes"}, status_code=413)
        t0 = time.monotonic()
        try:
            name, data = await asyncio.wait_for(self._read(request, limit), self.cfg.request_timeout_s)
            left = self.cfg.request_timeout_s - (time.monotonic() - t0)
            explain = request.query_params.get("explain", "0").lower() in ("1", "true", "yes")
            row = await asyncio.wait_for(self._score((name, data, explain)), max(0.001, left))
        except _TooLarge:
            return JSONResponse({"error": f"request too large: over {limit} bytes"}, status_code=413)
        except _BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except asyncio.TimeoutError:
            return JSONResponse(
                {"error": f"not answered within {self.cfg.request_timeout_s:g} s"}, status_code=504
            )
        return JSONResponse(row, status_code=200 if row.get("error") is None else 422)

    async def _read(self, request: Any, limit: int) -> tuple[str, bytes]:
        """(name, bytes) of the request: a multipart ``file`` field, else the raw body; read in chunks and
        abandoned past ``limit`` (a missing or lying Content-Length changes nothing)."""
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise _TooLarge()
            chunks.append(chunk)
        body = b"".join(chunks)
        name = request.query_params.get("name") or "upload"
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            name, body = await _multipart_file(request, body, name)
        if not body:
            raise _BadRequest("empty request: send the scan as the body or as multipart field 'file'")
        return name, body


class _TooLarge(Exception):
    pass


class _BadRequest(Exception):
    pass


async def _multipart_file(request: Any, body: bytes, default_name: str) -> tuple[str, bytes]:
    """The ``file`` field of a multipart/form-data body already read (and bounded) into memory."""
    from email import policy
    from email.parser import BytesParser

    head = f"Content-Type: {request.headers.get('content-type')}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    try:
        msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
        parts = list(msg.iter_parts()) if msg.is_multipart() else []
    except Exception as e:  # noqa: BLE001 - a malformed form is the client's error
        raise _BadRequest(f"malformed multipart body: {type(e).__name__}") from None
    for part in parts:
        if part.get_param("name", header="content-disposition") == "file":
            data = part.get_payload(decode=True) or b""
            return (request.query_params.get("name") or part.get_filename() or default_name), data
    raise _BadRequest("multipart body without a 'file' field")
