"""Issue 14, defects 1, 2, 10 and 11: no silent wrong answers from non-finite scores, bundles validated before
any work starts, output folders that are not a previous run refused, and user errors as one line.

Small resnet18 bundles at 32 px (as test_bundle.py builds them) and a few SYNTHETIC phantoms written here, so
everything but the one Ray test runs in seconds without ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import raytumor.bundle as rb
from raytumor.bundle import BundleMeta, load_bundle, read_meta, save_bundle
from raytumor.model import create_model, normalization

SIZE = 32


def _meta(**kw) -> BundleMeta:
    mean, std = normalization("resnet18")
    base = dict(backbone="resnet18", classes=["no", "yes"], negative_class="no", image_size=SIZE,
                mean=list(mean), std=list(std), threshold=0.5, temperature=1.0)  # fmt: skip
    return BundleMeta(**{**base, **kw})


def _state(seed: int = 0, classes: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return create_model("resnet18", classes, weights="none").state_dict()


def _nan_state() -> dict[str, torch.Tensor]:
    """Weights a training run diverged into: every float tensor NaN (hash and keys still consistent)."""
    return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in _state().items()}


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    return save_bundle(tmp_path_factory.mktemp("good") / "bundle", _state(), _meta())


@pytest.fixture(scope="module")
def nan_bundle(tmp_path_factory) -> Path:
    return save_bundle(tmp_path_factory.mktemp("nan") / "bundle", _nan_state(), _meta())


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Eight SYNTHETIC phantom PNGs in one folder."""
    from raytumor.phantoms import make_phantom

    root = tmp_path_factory.mktemp("scans") / "in"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(make_phantom(rng, size=64)).save(root / f"p{i}.png")
    return root


def _edited(good: Path, dest: Path, **changes) -> Path:
    """A copy of ``good`` whose bundle.json has ``changes`` (a value of ``...`` deletes the key)."""
    b = save_bundle(dest, load_bundle(good, device="cpu").model.state_dict(), read_meta(good))
    raw = json.loads((b / "bundle.json").read_text())
    for k, v in changes.items():
        raw.pop(k) if v is ... else raw.__setitem__(k, v)
    (b / "bundle.json").write_text(json.dumps(raw))
    return b


# ----------------------------------------------------------------------------------------------------------
# Defect 1: a non-finite score is an error row, never a class


def test_predict_labels_never_turns_nan_into_a_class():
    from raytumor.metrics import predict_labels

    probs = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8], [np.inf, np.nan]], dtype=np.float32)
    score = 1 - probs[:, 0]
    got = predict_labels(probs, score, ["no", "yes"], "no", 0.5)
    assert got.tolist() == [0, -1, 1, -1]  # old code: NaN rows called "no" (0)
    p3 = np.array([[0.2, 0.5, 0.3], [np.nan, 0.1, 0.2]])
    assert predict_labels(p3, np.full(2, np.nan), ["a", "b", "c"], None, 0.5).tolist() == [1, -1]


def test_score_actor_makes_nonfinite_rows_errors(nan_bundle, good_bundle, scans):
    """The scoring actor (in-process): a NaN forward gives an error row with a null label, not "no"."""
    from raytumor.score.actors import ScorePredictor
    from raytumor.score.decode import columns, decoded_row

    files = sorted(scans.iterdir())
    rows = [decoded_row(str(p), SIZE, p.read_bytes(), None, 0.05) for p in files]
    bad = ScorePredictor(str(nan_bundle), batch_size=4)(columns(rows)).to_pandas()
    assert len(bad) == len(files)
    assert bad["label"].isna().all(), bad["label"].tolist()
    assert bad["error"].str.startswith("non-finite score").all(), bad["error"].tolist()
    assert (bad["n_slices"] == 0).all() and bad["in_scope"].isna().all()
    ok = ScorePredictor(str(good_bundle), batch_size=4)(columns(rows)).to_pandas()
    assert ok["error"].isna().all() and ok["label"].isin(["no", "yes"]).all()


def test_predictor_batches_mark_nonfinite_rows_as_errors(nan_bundle):
    """Evaluation's Predictor: NaN rows get pred -1 and the non-finite error (evaluation drops error rows)."""
    from raytumor.predict import NONFINITE_ERROR, Predictor

    pred = Predictor.from_bundle(nan_bundle, device="cpu")
    images = np.random.default_rng(0).integers(0, 255, (3, SIZE, SIZE), dtype=np.uint8)
    out = pred({"image": images, "path": np.array(list("abc")), "error": np.array([None, "bad", None])})
    assert out["pred"].tolist() == [-1, -1, -1]
    assert out["error"].tolist() == [NONFINITE_ERROR, "bad", NONFINITE_ERROR]


def test_calibration_drops_nonfinite_rows_and_temperatures():
    from raytumor.calibrate import calibrate_bundle_meta, rescale_probs

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    s = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.1, 60), 0.01, 0.99)
    probs = np.stack([1 - s, s], 1)
    clean = calibrate_bundle_meta(_meta(), probs, y)
    probs_nan = np.r_[probs, [[np.nan, np.nan]]]
    rec = calibrate_bundle_meta(_meta(), probs_nan, np.r_[y, 1])
    # old code: the NaN positive counted as missed, pulling the threshold to -1 (every scan a tumour)
    assert 0.0 <= rec["threshold"] <= 1.0 and rec["threshold"] == clean["threshold"]
    for t in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            rescale_probs(probs, 1.0, t)


def test_nonfinite_majority_rule():
    from raytumor.score.job import nonfinite_failure

    base = {"output": "out"}
    assert "6 of 10 rows" in nonfinite_failure({**base, "scored": 4, "nonfinite_rows": 6})
    assert nonfinite_failure({**base, "scored": 5, "nonfinite_rows": 5}) is None  # half: error rows only
    assert nonfinite_failure({**base, "scored": 0, "nonfinite_rows": 0}) is None


@pytest.mark.ray
def test_scoring_job_with_mostly_nonfinite_rows_fails_loudly(ray_session, nan_bundle, scans, tmp_path,
                                                            monkeypatch, capsys):  # fmt: skip
    """Through Ray Data: a bundle that passes validation (stubbed here: NaN that shows only on real scans)
    but answers NaN writes error rows, the summary, and exits non-zero with one FAILED line."""
    import raytumor.score.job as job
    from raytumor.cli import main
    from raytumor.results import read_scores

    monkeypatch.setattr(job, "validate_bundle", lambda uri, storage=None: read_meta(uri), raising=False)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["score", "--bundle", str(nan_bundle), "--input", str(scans), "--output", str(out)])
    assert isinstance(e.value.code, str) and e.value.code.startswith("[score] FAILED: 8 of 8 rows")
    assert "\n" not in e.value.code
    df = read_scores(str(out))
    assert len(df) == 8 and df["label"].isna().all() and df["error"].str.startswith("non-finite").all()
    assert json.loads((out / "summary.json").read_text())["nonfinite_rows"] == 8


# ----------------------------------------------------------------------------------------------------------
# Defect 2: bundles validated (schema, ranges, hash, strict load, probe) before any work


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": 0}, "temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
        ({"image_size": -5}, "image_size -5 is outside"),
        ({"image_size": "96"}, "image_size must be an integer"),
        ({"classes": ...}, "lacks classes"),
        ({"classes": ["no"]}, "at least 2 class names"),
        ({"classes": ["no", "no"]}, "unique"),
        ({"classes": ["no", "yes", "maybe"]}, "does not fit resnet18 with 3 classes"),
        ({"negative_class": "normal"}, "negative_class 'normal' is not one of the classes"),
        ({"threshold": 1.5}, r"threshold must be a number in \[0, 1\]"),
        ({"backbone": "resnet9000"}, "unknown backbone"),
        ({"std": [0, 0, 0]}, "std must hold one positive value"),
        ({"bundle_id": "0123456789abcdef"}, "weights were replaced"),
    ],
)
def test_bad_bundle_metadata_is_refused(good_bundle, tmp_path, changes, message):
    b = _edited(good_bundle, tmp_path / "b", **changes)
    with pytest.raises(rb.BundleError, match=message):
        rb.validate_bundle(b)


def test_bad_weights_are_refused(good_bundle, nan_bundle, tmp_path):
    # a swapped model.pt (another valid model): the recorded hash catches it, in the actors' load too
    swapped = _edited(good_bundle, tmp_path / "swapped")
    torch.save(_state(seed=1), swapped / "model.pt")
    for check in (rb.validate_bundle, lambda b: load_bundle(b, device="cpu")):
        with pytest.raises(rb.BundleError, match="weights were replaced"):
            check(swapped)
    # random bytes whose hash bundle.json records: not a weights file (was a UnicodeDecodeError)
    junk = _edited(good_bundle, tmp_path / "junk")
    (junk / "model.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    raw = json.loads((junk / "bundle.json").read_text())
    from raytumor.bundle import file_sha256

    raw["bundle_id"] = file_sha256(junk / "model.pt")[:16]
    (junk / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(rb.BundleError, match="not a weights file"):
        rb.validate_bundle(junk)
    # NaN weights: consistent hash and keys, non-finite outputs on the probe input
    with pytest.raises(rb.BundleError, match="non-finite outputs"):
        rb.validate_bundle(nan_bundle)


def test_validation_is_cached_until_the_files_change(good_bundle, tmp_path, monkeypatch):
    import raytumor.bundle as bundle_mod

    b = _edited(good_bundle, tmp_path / "b")
    calls = []
    real = bundle_mod.probe_bundle
    monkeypatch.setattr(bundle_mod, "probe_bundle", lambda lb: calls.append(1) or real(lb))
    assert rb.validate_bundle(b).bundle_id == rb.validate_bundle(str(b)).bundle_id
    assert len(calls) == 1  # the second call skipped the model build and probe
    raw = json.loads((b / "bundle.json").read_text())
    (b / "bundle.json").write_text(json.dumps({**raw, "temperature": 0}))
    with pytest.raises(rb.BundleError, match="temperature"):
        rb.validate_bundle(b)


# ----------------------------------------------------------------------------------------------------------
# Defects 10 and 11: inputs and bundle checked before anything is created or Ray starts; one line, exit 2


@pytest.fixture()
def no_ray(monkeypatch):
    """Any attempt to start Ray fails the test: every refusal here must come before it."""
    import raytumor.evaluate
    import raytumor.score.job

    def boom(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(raytumor.score.job, "init_ray", boom)
    monkeypatch.setattr(raytumor.evaluate, "init_ray", boom)


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("raytumor ") and "error:" in err, err
    for n in needles:
        assert n in err, err
    return err


def test_bad_bundle_fails_score_and_evaluate_in_one_line_before_ray(good_bundle, scans, tmp_path, no_ray,
                                                                    capsys):  # fmt: skip
    from raytumor.cli import main

    bad = _edited(good_bundle, tmp_path / "bad", temperature=0)
    out = tmp_path / "out"
    assert main(["score", "--bundle", str(bad), "--input", str(scans), "--output", str(out)]) == 2
    _one_line_error(capsys, "temperature must be a finite number > 0")
    assert not out.exists()
    ev = tmp_path / "ev"
    assert main(["evaluate", "--bundle", str(bad), "--data", str(scans), "--out", str(ev)]) == 2
    _one_line_error(capsys, "temperature")
    assert not ev.exists()
    # --debug (global, before or after the sub-command) keeps the traceback
    for argv in (["--debug", "score"], ["score", "--debug"]):
        with pytest.raises(rb.BundleError):
            main([*argv, "--bundle", str(bad), "--input", str(scans), "--output", str(out)])


def test_missing_input_is_one_line_and_leaves_nothing(good_bundle, tmp_path, no_ray, capsys):
    from raytumor.cli import main

    out = tmp_path / "out"
    argv = ["score", "--bundle", str(good_bundle), "--input", str(tmp_path / "nope"), "--output", str(out)]
    assert main(argv) == 2
    _one_line_error(capsys, "input not found", str(tmp_path / "nope"))
    assert not out.exists()  # no stray run.json


def test_missing_bucket_is_one_line(good_bundle, s3_server, tmp_path, no_ray, capsys):
    from raytumor.cli import main

    out = tmp_path / "out"
    argv = ["score", "--bundle", str(good_bundle), "--input", "s3://nosuchbucket/prefix",
            "--output", str(out), "--s3-endpoint", s3_server]  # fmt: skip
    assert main(argv) == 2
    _one_line_error(capsys, "s3://nosuchbucket/prefix")
    assert not out.exists()


def test_output_folder_with_other_files_is_refused(good_bundle, scans, tmp_path, no_ray, capsys):
    from raytumor.cli import main

    out = tmp_path / "out"
    (out / "scores").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "scores" / "keep.txt").write_text("mine too")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    argv = ["score", "--bundle", str(good_bundle), "--input", str(scans), "--output", str(out)]
    for extra in ([], ["--overwrite"]):  # --overwrite must not delete someone's files either
        assert main(argv + extra) == 2
        _one_line_error(capsys, "not empty", "notes.txt")
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
        assert (out / "notes.txt").read_text() == "mine"


def test_bad_config_file_is_one_line(tmp_path, capsys):
    from raytumor.cli import main

    cfg = tmp_path / "score.yaml"
    cfg.write_text("bundel: x\n")
    assert main(["score", "--config", str(cfg)]) == 2
    _one_line_error(capsys, "unknown options")
