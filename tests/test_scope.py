"""The bundle's scope: view net, OOD reference, scope rules, and out_of_scope rows (raytumor.scope)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from raytumor.bundle import HEADS_FILE, META_FILE, load_bundle, read_meta, save_bundle
from raytumor.predict import Predictor
from raytumor.results import OUT_OF_SCOPE, read_scores, summarise
from raytumor.scope import (
    NOT_BRAIN,
    Heads,
    Scope,
    count_scope,
    fit_ood,
    fit_threshold,
    fit_view_net,
    geometry_views,
    ledoit_wolf,
)
from tests.conftest import phantom_volume, shared_dataset

# ----------------------------------------------------------------------------------------------------------
# Unit rules


def test_scope_rules_modality_view_ood_in_that_order():
    s = Scope(
        classes=["no", "yes"],
        counts={"view": {"axial": {"no": 60, "yes": 55}, "sagittal": {"no": 300, "yes": 10}}},
        min_examples=50,
        ood_threshold=3.0,
    )
    assert s.views == ["axial"]  # sagittal has too few tumour examples
    views = ["axial", "sagittal", None, "axial", "axial", "coronal"]
    mods = [None, "MR", None, "CT", None, "MR"]
    ood = np.array([1.0, 1.0, 1.0, 9.0, 4.0, np.nan])
    keep, reasons = s.check(views, mods, ood)
    assert keep.tolist() == [True, False, False, False, False, False]
    assert reasons == [
        None,
        "view sagittal",
        "view unknown",
        "modality CT",
        "out of distribution",
        "view coronal",
    ]
    # Without a recorded scope only the modality (and OOD) rules apply.
    keep, reasons = Scope(classes=[]).check(views, mods, np.full(6, np.nan), gate_views=False)
    assert keep.tolist() == [True, True, True, False, True, True]


def test_slices_far_below_the_vertex_are_not_brain_and_never_in_scope():
    views = ["axial", "axial", "axial", "axial", "coronal", "sagittal", "oblique", None]
    below = [40.0, 150.0, 160.0, 205.0, None, 190.0, 10.0, 50.0]
    # the skull-base band (150-170 mm) is left out of the view net's training; only axial cuts are by depth
    assert geometry_views(views, below) == [
        "axial",
        "axial",
        None,
        NOT_BRAIN,
        "coronal",
        "sagittal",
        None,
        None,
    ]
    assert geometry_views(["axial", "coronal"], None) == ["axial", "coronal"]
    s = Scope(
        classes=["no", "yes"],
        counts={"view": {"axial": {"no": 60, "yes": 60}, NOT_BRAIN: {"no": 900, "yes": 900}}},
        min_examples=50,
    )
    assert s.views == ["axial"]  # however many training examples the view net called not_brain
    keep, reasons = s.check([NOT_BRAIN, "axial"], [None, None], np.array([0.0, 0.0]))
    assert keep.tolist() == [False, True] and reasons[0] == "not brain (view net)"
    # --score-out-of-scope's gate-free check still says why
    assert Scope(classes=[]).check([NOT_BRAIN], [None], np.zeros(1), gate_views=False)[1] == [
        "not brain (view net)"
    ]


def test_view_net_learns_not_brain_from_ixi_cuts_below_the_skull_base(tmp_path):
    """Real IXI T1 volumes exported as a user does (``raytumor slices --planes axial,coronal,sagittal
    --depth-mm 0``): the view net trained on 8 subjects calls another 2 subjects' neck slices not_brain
    and their brain slices by plane."""
    from raytumor.preprocess import model_inputs
    from raytumor.slices import SlicesConfig, export_slices

    vols = sorted((shared_dataset("ixi-t1-nichart-42") / "nifti").glob("*.nii.gz"))[:10]
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(map(str, vols)) + "\n")
    cfg = SlicesConfig(
        input=[str(listing)], out=str(tmp_path / "views"), label="no", source="IXI",
        patient_pattern=r"^(IXI\d+)", every_mm=8.0, planes=["axial", "coronal", "sagittal"], depth_mm=0,
    )  # fmt: skip
    export_slices(cfg)
    man = pd.read_csv(tmp_path / "views" / "manifest.csv")
    man["view"] = geometry_views(man["view"].tolist(), man["mm_below_vertex"].tolist())
    man = man[man["view"].notna()].reset_index(drop=True)
    x = np.concatenate(
        [model_inputs((tmp_path / "views" / p).read_bytes(), 96, None)[0] for p in man["path"]]
    )
    held = man["patient_id"].isin({v.name.split("-")[0] for v in vols[8:]}).to_numpy()
    assert (man.loc[~held, "view"] == NOT_BRAIN).sum() >= 40 and (
        man.loc[held, "view"] == NOT_BRAIN
    ).sum() >= 8
    net = fit_view_net(x[~held], man.loc[~held, "view"].tolist(), max_steps=300, batch_size=64, seed=0)
    called, truth = net.predict(x[held]), man.loc[held, "view"].to_numpy()
    assert net.views == ["axial", "coronal", "sagittal", NOT_BRAIN]
    assert (called[truth == NOT_BRAIN] == NOT_BRAIN).mean() >= 0.9
    brain = truth == "axial"
    assert (called[brain] == "axial").mean() >= 0.9 and (
        called[truth == "sagittal"] == "sagittal"
    ).mean() >= 0.9


def test_count_scope_skips_synthetic_examples_and_counts_unknown_views():
    counts, n_syn = count_scope(
        ["no", "yes", "yes", "no", "yes"],
        ["axial", "axial", None, "sagittal", "axial"],
        ["flair", None, "t1c", "flair", "flair"],
        [False, False, False, False, True],
    )
    assert n_syn == 1
    assert counts["view"] == {"axial": {"no": 1, "yes": 1}, "unknown": {"yes": 1}, "sagittal": {"no": 1}}
    assert counts["sequence"] == {"flair": {"no": 2}, "t1c": {"yes": 1}}
    # A synthetic-only bundle has nothing in scope, however many examples it saw.
    counts, n_syn = count_scope(["no"] * 100 + ["yes"] * 100, ["axial"] * 200, None, [True] * 200)
    assert Scope(classes=["no", "yes"], counts=counts, synthetic=n_syn).views == []


def test_ledoit_wolf_shrinks_towards_scaled_identity_and_is_invertible():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 200))  # fewer samples than dimensions: the sample covariance is singular
    x -= x.mean(0)
    cov = ledoit_wolf(x)
    assert np.linalg.matrix_rank(x.T @ x) < 200
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).mean() < np.abs((x.T @ x / 50) - np.diag(np.diag(x.T @ x / 50))).mean()


def test_ood_layers_are_scaled_and_an_outlier_in_any_layer_is_flagged():
    rng = np.random.default_rng(3)
    # layer 0 is wide with large values; the outlier differs only in layer 1 (narrow)
    inside = np.concatenate([rng.normal(0, 50, (600, 32)), rng.normal(0, 1, (600, 4))], 1)
    ref = fit_ood(inside, np.array([0, 1] * 300), [32, 4])
    # Mahalanobis distances ignore units but grow with width (~sqrt(D)): scaling by each layer's median keeps
    # the wide layer from hiding the narrow one
    assert ref.layout == [32, 4] and ref.scales[0] > 2 * ref.scales[1]
    assert np.median(ref.layer_distances(inside) / ref.scales, axis=0) == pytest.approx([1.0, 1.0], abs=0.05)
    ref.threshold = fit_threshold(ref.score(inside), 0.99)
    odd = np.concatenate([rng.normal(0, 50, (50, 32)), rng.normal(0, 1, (50, 4)) + 8], 1)
    assert (ref.score(odd) > ref.threshold).mean() == 1.0
    with pytest.raises(ValueError, match="layout"):
        fit_ood(inside, np.zeros(600), [30, 4])


def test_ood_reference_flags_shifted_points_and_threshold_is_a_quantile():
    rng = np.random.default_rng(1)
    feats = np.concatenate([rng.normal(0, 1, (400, 16)), rng.normal(3, 1, (400, 16))])
    labels = np.array([0] * 400 + [1] * 400)
    ref = fit_ood(feats, labels)
    val = np.concatenate([rng.normal(0, 1, (500, 16)), rng.normal(3, 1, (500, 16))])
    ref.threshold = fit_threshold(ref.score(val), 0.99)
    assert (ref.score(val) > ref.threshold).mean() <= 0.011
    far = rng.normal(0, 1, (200, 16)) + np.array([10.0] + [0.0] * 15)
    assert (ref.score(far) > ref.threshold).mean() == 1.0


def _plane_images(n: int, size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Phantom head slices cut along z (axial) and x (sagittal), as uint8 model inputs."""
    from raytumor.formats import fit_square

    vol = phantom_volume(seed=seed, n_slices=size, size=size)  # (z, y, x)
    zs = np.linspace(size // 4, 3 * size // 4, n).astype(int)
    ax = [vol[z] for z in zs]
    sag = [np.ascontiguousarray(vol[::-1, :, x]) for x in zs]
    ims = [fit_square(np.asarray(a, dtype=np.uint8), 96) for a in ax + sag]
    return np.stack(ims), ["axial"] * n + ["sagittal"] * n


def test_view_net_learns_planes_and_round_trips_with_weights_only(tmp_path):
    x, v = _plane_images(24, 96, seed=3)
    net = fit_view_net(x, v, max_steps=120, batch_size=32, seed=0)
    xt, vt = _plane_images(12, 96, seed=11)  # another head
    assert (net.predict(xt) == np.array(vt)).mean() >= 0.95
    f = np.random.default_rng(2).normal(0, 1, (120, 8))
    ood = fit_ood(f, [0] * 60 + [1] * 60)
    ood.threshold = 5.0
    Heads(net, ood).save(tmp_path / HEADS_FILE)
    torch.load(tmp_path / HEADS_FILE, weights_only=True)  # tensors and plain types only
    back = Heads.load(tmp_path / HEADS_FILE)
    assert back.view.views == ["axial", "sagittal"]
    assert (back.view.predict(xt) == net.predict(xt)).all()
    np.testing.assert_allclose(back.ood.score(f), ood.score(f), rtol=1e-5)
    assert back.ood.threshold == 5.0


# ----------------------------------------------------------------------------------------------------------
# A bundle with a scope (the phantom head bundle, its heads fitted here as training fits them)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _photo() -> np.ndarray:
    from skimage import data as skdata

    return skdata.astronaut()


def _text_page(size: int = 256) -> np.ndarray:
    img = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(img)
    for i in range(12):
        d.text((8, 8 + 20 * i), f"Radiology report line {i}: no acute findings", fill=0)
    return np.asarray(img)


def _sagittal_slices(n: int, size: int) -> list[np.ndarray]:
    vol = phantom_volume(seed=3, n_slices=size, size=size)  # (z, y, x)
    return [
        np.ascontiguousarray(vol[::-1, :, x]) for x in np.linspace(size // 4, 3 * size // 4, n).astype(int)
    ]


@pytest.fixture(scope="module")
def scoped_bundle(head_bundle, tmp_path_factory) -> Path:
    """The head bundle plus heads fitted on its training half (OOD) and phantom axial vs sagittal cuts
    (view net), with a scope whose axial view counts as real so the phantoms are in scope."""
    out = tmp_path_factory.mktemp("scoped") / "bundle"
    shutil.copytree(head_bundle.bundle, out)
    pr = Predictor.from_bundle(out, device="cpu")
    size = pr.meta.image_size

    def feats(blobs: list[bytes]) -> np.ndarray:
        x = np.concatenate([pr.inputs(b)[0] for b in blobs])
        return pr.predict(x)[1]

    train = [Path(p).read_bytes() for p in head_bundle.train["path"]]
    ev = [Path(p).read_bytes() for p in head_bundle.eval["path"]]
    f_train, f_eval = feats(train), feats(ev)
    layout = pr.feature_layout()
    ood = fit_ood(f_train, head_bundle.train["label"].to_numpy(), layout)
    ood.threshold = fit_threshold(ood.score(f_eval), 0.99)
    sag = [_png(s) for s in _sagittal_slices(24, 96)]
    x = np.concatenate([pr.inputs(b)[0] for b in train + sag])
    net = fit_view_net(x, ["axial"] * len(train) + ["sagittal"] * len(sag), max_steps=150, batch_size=32)
    meta = read_meta(out)
    meta.scope = Scope(
        classes=meta.classes,
        counts={"view": {"axial": {"no": 200, "yes": 200}, "sagittal": {"no": 200}}},
        ood_threshold=ood.threshold,
        ood_quantile=0.99,
        view_head=True,
    ).to_dict()
    state = torch.load(out / "model.pt", weights_only=True)
    save_bundle(out, state, meta, heads=Heads(net, ood))
    assert size == meta.image_size
    return out


def test_scoped_bundle_stores_heads_and_refuses_a_swapped_heads_file(scoped_bundle, tmp_path):
    meta = json.loads((scoped_bundle / META_FILE).read_text())
    assert meta["scope"]["views_in_scope"] == ["axial"]
    assert len(meta["scope"]["heads_sha256"]) == 64
    b = load_bundle(scoped_bundle, device="cpu")
    assert b.heads.view is not None and b.heads.ood is not None
    bad = tmp_path / "b"
    shutil.copytree(scoped_bundle, bad)
    h = Heads.load(bad / HEADS_FILE)
    h.ood.threshold = 1e9
    h.save(bad / HEADS_FILE)
    with pytest.raises(ValueError, match="does not match the bundle"):
        load_bundle(bad, device="cpu")


def test_predictor_flags_photos_text_noise_and_sagittal_keeps_phantoms(scoped_bundle, head_bundle):
    pr = Predictor.from_bundle(scoped_bundle, device="cpu")
    rng = np.random.default_rng(0)
    others = {
        "photo": _png(_photo()),
        "text": _png(_text_page()),
        "noise": _png(rng.integers(0, 256, (128, 128), dtype=np.uint8)),
    }
    phantoms = [Path(p).read_bytes() for p in head_bundle.eval["path"]]
    sag = [_png(s) for s in _sagittal_slices(5, 96)]
    blobs = phantoms + list(others.values()) + sag
    x = np.concatenate([pr.inputs(b)[0] for b in blobs])
    probs, feats = pr.predict(x)
    a = pr.assess(pr.ood_scores(feats), pr.model_views(x))
    n = len(phantoms)
    assert a.in_scope[:n].mean() >= 0.95  # ~99 % of in-distribution images pass by construction
    assert not a.in_scope[n : n + 3].any()
    assert set(a.scope_reason[n : n + 3]) <= {"out of distribution", "view sagittal"}
    assert a.view[n + 3 :] == ["sagittal"] * 5 and a.view_source[n + 3 :] == ["model"] * 5
    assert not a.in_scope[n + 3 :].any()
    labels = pr.label_names(pr.labels(probs, pr.scores(probs)), np.ones(len(blobs), bool), a.in_scope)
    assert labels[n:] == [OUT_OF_SCOPE] * (len(blobs) - n)
    assert OUT_OF_SCOPE not in labels[:n] or a.in_scope[:n].mean() < 1
    anyway = pr.label_names(pr.labels(probs, pr.scores(probs)), np.ones(len(blobs), bool), a.in_scope, True)
    assert OUT_OF_SCOPE not in anyway


def test_ct_dicom_is_out_of_scope_by_modality(scoped_bundle):
    from pydicom.data import get_testdata_file

    pr = Predictor.from_bundle(scoped_bundle, device="cpu")
    x, scan = pr.inputs(Path(get_testdata_file("CT_small.dcm")).read_bytes(), volumes=True)
    assert scan.modality == "CT"
    probs, feats = pr.predict(x)
    a = pr.assess(pr.ood_scores(feats), pr.model_views(x), [scan.view], [scan.modality])
    assert a.in_scope.tolist() == [False] and a.scope_reason == ["modality CT"]
    assert np.isfinite(probs).all()  # the probabilities are kept


def test_score_job_writes_out_of_scope_rows(scoped_bundle, head_bundle, ray_session, tmp_path):
    from pydicom.data import get_testdata_file

    from raytumor.score import ScoreConfig, score

    inp = tmp_path / "archive"
    inp.mkdir()
    for p in head_bundle.eval["path"][:6]:
        shutil.copy(p, inp / Path(p).name)
    (inp / "photo.png").write_bytes(_png(_photo()))
    (inp / "sag.png").write_bytes(_png(_sagittal_slices(1, 96)[0]))
    shutil.copy(get_testdata_file("CT_small.dcm"), inp / "ct.dcm")
    (inp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    s = score(ScoreConfig(bundle=str(scoped_bundle), input=str(inp), output=str(out)))
    rows = read_scores(str(out)).set_index(pd.Index([Path(p).name for p in read_scores(str(out))["path"]]))
    assert len(rows) == 10 and s["rows"] == 10
    assert rows.loc["ct.dcm", "label"] == OUT_OF_SCOPE and rows.loc["ct.dcm", "scope_reason"] == "modality CT"
    assert rows.loc["photo.png", "label"] == OUT_OF_SCOPE
    assert rows.loc["sag.png", "label"] == OUT_OF_SCOPE and rows.loc["sag.png", "view"] == "sagittal"
    assert np.isfinite(rows.loc["photo.png", "score"])  # probabilities kept
    assert rows.loc["broken.png", "error"] is not None and pd.isna(rows.loc["broken.png", "in_scope"])
    ph = rows.loc[[Path(p).name for p in head_bundle.eval["path"][:6]]]
    assert ph["view"].eq("axial").all() and ph["view_source"].eq("model").all()
    assert s["out_of_scope"] == int((rows["label"] == OUT_OF_SCOPE).sum()) >= 3
    assert s["out_of_scope_reasons"]["modality CT"] == 1
    assert s["positives"] == int(rows["label"].eq("yes").sum())
    assert summarise(rows.reset_index(drop=True), "no")["out_of_scope"] == s["out_of_scope"]
    # --score-out-of-scope: the same rows labelled with a class anyway, scope columns unchanged.
    out2 = tmp_path / "out2"
    s2 = score(
        ScoreConfig(bundle=str(scoped_bundle), input=str(inp), output=str(out2), score_out_of_scope=True)
    )
    rows2 = read_scores(str(out2))
    assert OUT_OF_SCOPE not in set(rows2["label"].dropna())
    assert int((~rows2["in_scope"].fillna(True).astype(bool)).sum()) == s["out_of_scope"]
    # ... and the summary still counts them, by reason (it said "0 out of scope" before)
    assert s2["out_of_scope"] == 0 and s2["out_of_scope_labelled"] == s["out_of_scope"]
    assert s2["out_of_scope_labelled_reasons"] == s["out_of_scope_reasons"]


def test_known_view_fills_views_a_manifest_lacks_and_is_checked():
    from raytumor.train.config import TrainConfig
    from raytumor.train.package import declared_views

    man = pd.DataFrame(
        {
            "path": ["a", "b", "c", "d"],
            "source": ["tcga-lgg-CS", "tcga-lgg-DU", "br35h-3000", "IXI"],
            "view": pd.array([pd.NA, None, None, "coronal"], dtype="string"),  # as concatenated manifests are
        }
    )
    cfg = TrainConfig(data=["x"], known_view=["tcga-lgg-*=axial"])
    assert declared_views(man, cfg).tolist() == ["axial", "axial", None, "coronal"]  # the manifest wins
    assert declared_views(man.drop(columns="view"), TrainConfig(data=["x"])).isna().all()
    with pytest.raises(ValueError, match="SOURCE=VIEW"):
        TrainConfig(data=["x"], known_view=["tcga-lgg-*=axail"])


def test_a_bundle_with_heads_but_no_scope_yet_loads(head_bundle, tmp_path):
    # what training writes first: the view net's heads, the scope counted only after the feature pass
    out = tmp_path / "staging"
    shutil.copytree(head_bundle.bundle, out)
    x, v = _plane_images(8, 96, seed=3)
    meta = read_meta(out)
    meta.scope = {}
    state = torch.load(out / "model.pt", weights_only=True)
    save_bundle(out, state, meta, heads=Heads(fit_view_net(x, v, max_steps=5, batch_size=8)))
    assert set(read_meta(out).scope) == {"heads_sha256"}
    pr = Predictor.from_bundle(out, device="cpu")
    assert pr.heads.view is not None and not pr.scope_recorded
