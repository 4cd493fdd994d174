"""``raytumor serve``: the Ray Serve endpoint gives the batch scorer's rows for the same files (probabilities
to 1e-6, same labels, scope fields and errors), the bundle card, a health check, 413 for oversized bodies,
and refuses to bind beyond loopback without a token."""

from __future__ import annotations

import base64
import io
import json
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import write_phantom_volume

from raytumor.results import read_scores
from raytumor.score import ScoreConfig, score
from raytumor.serve import ServeConfig, build_app


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_binding_beyond_loopback_needs_a_token(tmp_path):
    with pytest.raises(ValueError, match="token-file"):
        ServeConfig(bundle="b", host="0.0.0.0")
    ServeConfig(bundle="b", host="::1")
    short = tmp_path / "t"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="16 characters"):
        ServeConfig(bundle="b", host="0.0.0.0", token_file=str(short)).token()


@pytest.fixture(scope="module")
def served(ray_session, head_bundle):
    from ray import serve

    port = _port()
    cfg = ServeConfig(bundle=str(head_bundle.bundle), port=port, replicas=1, max_request_bytes=4 << 20)
    serve.start(http_options={"host": cfg.host, "port": port})
    serve.run(build_app(cfg), name="raytumor", route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_the_endpoint_gives_the_batch_scorers_rows(served, head_bundle, phantoms, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    files = sorted((phantoms / "yes").iterdir())[:6] + sorted((phantoms / "no").iterdir())[:6]
    for p in files:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    write_phantom_volume(src / "vol.nii.gz", seed=3, n_slices=40)
    out = tmp_path / "out"
    score(ScoreConfig(bundle=str(head_bundle.bundle), input=str(src), output=str(out)))
    batch = read_scores(str(out)).set_index("path")
    served_rows = {}
    for i, p in enumerate(sorted(src.iterdir())):
        url = f"{served}/v1/score?name={urllib.request.quote(str(p))}"
        if i % 2:  # raw body and multipart alike
            status, row = _post(url, p.read_bytes())
        else:
            body, ctype = _multipart(p.name, p.read_bytes())
            status, row = _post(url, body, {"Content-Type": ctype})
        assert status == (422 if p.name == "broken.jpg" else 200), (p.name, status, row)
        served_rows[str(p)] = row
    assert set(served_rows) == set(batch.index)
    for path, row in served_rows.items():
        b = batch.loc[path]
        assert set(row) == set(batch.columns) | {"path"}
        for col in ("label", "kind", "format", "n_slices", "slice", "view", "view_source", "in_scope",
                    "scope_reason", "error", "bundle_id", "adaptation"):  # fmt: skip
            want = b[col]
            want = (
                None
                if not isinstance(want, str) and (want is None or np.ndim(want) == 0 and np.isnan(want))
                else want
            )
            assert row[col] == want or (row[col] is None and want is None), (path, col, row[col], want)
        for col in ("prob_no", "prob_yes", "score", "score_mean", "score_max", "ood_score"):
            if row[col] is None:
                assert np.isnan(b[col]), (path, col)
            else:
                assert abs(row[col] - float(b[col])) <= 1e-6, (path, col, row[col], b[col])
    assert served_rows[str(src / "vol.nii.gz")]["kind"] == "volume"


def test_model_card_health_and_request_limits(served, head_bundle):
    with urllib.request.urlopen(f"{served}/healthz", timeout=30) as r:
        health = json.loads(r.read())
    with urllib.request.urlopen(f"{served}/v1/model", timeout=30) as r:
        card = json.loads(r.read())
    meta = json.loads((Path(head_bundle.bundle) / "bundle.json").read_text())
    assert health["status"] == "ok" and health["bundle_id"] == card["bundle_id"] == meta["bundle_id"]
    assert card["classes"] == ["no", "yes"] and card["research_use_only"] is True
    status, body = _post(f"{served}/v1/score", b"x" * (5 << 20))
    assert status == 413 and "too large" in body["error"]
    status, body = _post(f"{served}/v1/score", b"")
    assert status == 400 and "empty" in body["error"]
    assert _post(f"{served}/v1/nothing", b"x")[0] == 404


def test_explain_returns_the_grad_cam_overlay(served, phantoms):
    from PIL import Image

    scan = sorted((phantoms / "yes").iterdir())[0]
    status, row = _post(f"{served}/v1/score?explain=1&name=scan.jpg", scan.read_bytes())
    assert status == 200 and row["label"] in ("no", "yes", "out_of_scope")
    if row["label"] == "out_of_scope":
        assert row["explain_png"] is None  # nothing to explain for a scan the bundle may not score
        return
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["explain_png"]))).convert("RGB"))
    assert img.shape[0] >= 64 and img.std() > 10  # a picture, not a blank


def test_serve_config_files_validate_against_rays_schema():
    """cluster/serve.yaml and the RayService's embedded config parse with Ray Serve's own schema, point at
    a builder that exists, and their args are valid `raytumor serve` options (a token is required)."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    cluster = Path(__file__).resolve().parents[1] / "cluster"
    service = yaml.safe_load((cluster / "kuberay-rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    for doc in (
        yaml.safe_load((cluster / "serve.yaml").read_text()),
        yaml.safe_load(service["spec"]["serveConfigV2"]),
    ):
        schema = (
            ServeDeploySchema.model_validate(doc)
            if hasattr(ServeDeploySchema, "model_validate")
            else ServeDeploySchema.parse_obj(doc)
        )
        (app,) = schema.applications
        module, attr = app.import_path.split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        cfg = ServeConfig(**{"host": "0.0.0.0", **app.args})
        assert cfg.token_file and cfg.max_batch_size >= 1
        with pytest.raises(ValueError, match="token-file"):
            ServeConfig(**{"host": "0.0.0.0", **{k: v for k, v in app.args.items() if k != "token_file"}})
