"""Bundle save/load round trip and the Predictor on top of it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from raytumor.bundle import BundleMeta, load_bundle, read_meta, save_bundle
from raytumor.metrics import tumour_score
from raytumor.model import create_model, normalization
from raytumor.predict import Predictor


def _meta(**kw) -> BundleMeta:
    mean, std = normalization("resnet18")
    base = dict(
        backbone="resnet18",
        classes=["no", "yes"],
        negative_class="no",
        image_size=32,
        mean=list(mean),
        std=list(std),
    )
    base.update(kw)
    return BundleMeta(**base)


@pytest.fixture()
def bundle_dir(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", 2, weights="none")
    fps = pd.DataFrame({"path": ["a"], "sha256": ["0" * 64], "dhash": [np.int64(5)], "thumb": [b"\x00" * 16]})
    path = save_bundle(
        tmp_path / "b", model.state_dict(), _meta(threshold=0.3), fps, pd.DataFrame({"epoch": [0]})
    )
    return path, model


def test_round_trip_same_outputs(bundle_dir):
    path, model = bundle_dir
    loaded = load_bundle(path, device="cpu")
    x = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        got = loaded.model(x.unsqueeze(1).contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ref, got, atol=1e-5)
    meta = read_meta(path)
    assert meta.classes == ["no", "yes"] and meta.threshold == 0.3
    assert len(meta.bundle_id) == 16 and meta.versions["torch"] == torch.__version__
    raw = json.loads((path / "bundle.json").read_text())
    assert {"backbone", "image_size", "mean", "std", "channels", "versions", "temperature"} <= set(raw)
    assert loaded.train_fingerprints()["dhash"].tolist() == [5]
    # weights_only loading works on the raw file (no pickled code in the bundle)
    assert isinstance(torch.load(path / "model.pt", weights_only=True), dict)


def test_predictor_rows_and_threshold(bundle_dir):
    path, _ = bundle_dir
    pred = Predictor.from_bundle(path, device="cpu")
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8)
    out = pred(
        {"image": images, "path": np.array(list("abcd")), "error": np.array([None, None, "bad", None])}
    )
    assert set(out) >= {"prob_no", "prob_yes", "score", "pred", "path"}
    assert np.isnan(out["prob_yes"][2]) and out["pred"][2] == -1
    ok = [0, 1, 3]
    np.testing.assert_allclose(out["prob_no"][ok] + out["prob_yes"][ok], 1, atol=1e-5)
    np.testing.assert_allclose(out["score"][ok], out["prob_yes"][ok], atol=1e-6)
    assert ((out["score"][ok] >= 0.3) == (out["pred"][ok] == 1)).all()


def test_not_a_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model bundle"):
        read_meta(tmp_path)


def test_tumour_score_with_negative_first_or_last():
    p = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    assert torch.allclose(tumour_score(p, *_classes(_meta())), torch.tensor([0.8, 0.1]))
    assert torch.allclose(tumour_score(p, *_classes(_meta(classes=["yes", "no"]))), torch.tensor([0.2, 0.9]))


def _classes(meta: BundleMeta) -> tuple[list[str], str | None]:
    return meta.classes, meta.negative_class
