"""``raytumor review``: the rows, filters and verdict log; the corrections export read back by training's own
listing and decoding; the server's guards; and the page itself in Debian's Chromium (Selenium, the system
chromedriver, nothing downloaded), over a real score output of 1,000+ rows."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA, build_head_bundle, run_env, stop_group
from PIL import Image

from raytumor import formats
from raytumor.ingest import decode_batch, list_labelled
from raytumor.review.export import export_corrections
from raytumor.review.scans import ScanViewer
from raytumor.review.store import REVIEW_FIELDS, Query, ReviewStore, natural_key, row_source
from raytumor.score.job import ScoreConfig, score
from raytumor.storage import MEMBER_SEP, StorageOptions, parse_member_id
from raytumor.synth_dicom import new_uid, write_series

DATA = SHARED_DATA
N_IMAGES = 1000  # the issue: a scoring output of >= 1,000 rows
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

needs_data = pytest.mark.skipif(
    not all((DATA / d).is_dir() for d in ("br35h-3000", "navoneel-253", "ixi-t1-nichart-42")),
    reason="needs ../shared/data/{br35h-3000,navoneel-253,ixi-t1-nichart-42}",
)


def test_member_ids_parse_back():
    assert parse_member_id("/a/b.zip!x/y.jpg") == ("/a/b.zip", "x/y.jpg", 1)
    assert parse_member_id("s3://b/a.tar.gz!m.dcm#3") == ("s3://b/a.tar.gz", "m.dcm", 3)
    assert parse_member_id("/a/odd!name/b.zip!m!x.png") == ("/a/odd!name/b.zip", "m!x.png", 1)
    # a member really named "...#2" stays itself when the archive says it exists
    assert parse_member_id("/a/b.zip!scan#2", known=lambda a, m: m == "scan#2") == ("/a/b.zip", "scan#2", 1)
    assert parse_member_id("/a/not-an-archive!x.jpg") is None
    assert parse_member_id("/a/plain.jpg") is None


def test_row_sources():
    root = "/data/export"
    assert row_source("/data/export/siteA/x/1.jpg", root) == "siteA"
    assert row_source("/data/export/1.jpg", root) == "export"
    assert row_source(f"/data/export/b.zip{MEMBER_SEP}in/1.jpg", root) == "b.zip"
    assert row_source("/data/export/STUDY/S1#series-abc", root) == "STUDY"
    assert row_source("/elsewhere/q.png", "", {"/elsewhere/q.png": "hospital-B"}) == "hospital-B"


# ----------------------------------------------------------------------------------------------------------
# A real score output: 1,000 Br35H JPEGs, two IXI volumes, one IXI volume as a DICOM series, a zip, a broken
# file; scored by a head fitted on navoneel-253 (real features, so some rows are flagged and some not).


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    if not all((DATA / d).is_dir() for d in ("br35h-3000", "navoneel-253", "ixi-t1-nichart-42")):
        pytest.skip("needs ../shared/data/{br35h-3000,navoneel-253,ixi-t1-nichart-42}")
    import nibabel as nib

    work = tmp_path_factory.mktemp("review")
    hb = build_head_bundle(DATA / "navoneel-253", work / "hb")
    src = work / "in"
    for cls in ("yes", "no"):
        (src / "br35h" / cls).mkdir(parents=True)
        for p in sorted((DATA / "br35h-3000" / cls).iterdir())[: N_IMAGES // 2]:
            shutil.copy(p, src / "br35h" / cls / p.name)
    vols = sorted((DATA / "ixi-t1-nichart-42" / "nifti").glob("*.nii.gz"))
    (src / "ixi").mkdir()
    for v in vols[:2]:
        shutil.copy(v, src / "ixi" / v.name)
    img = nib.load(vols[2])
    d = img.dataobj
    rng = np.random.default_rng(0)
    write_series(src / "pacs" / "STUDY1" / "S1", np.asarray(d.get_unscaled()), img.affine, rng=rng,
                 study_uid=new_uid(rng), series_uid=new_uid(rng), rescale=(float(d.slope), float(d.inter)))  # fmt: skip
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    with zipfile.ZipFile(src / "extra.zip", "w") as z:
        for p in sorted((DATA / "br35h-3000" / "yes").iterdir())[-3:]:
            z.write(p, f"inner/{p.name}")
    out = work / "out"
    summary = score(ScoreConfig(bundle=str(hb.bundle), input=str(src), output=str(out)))
    assert summary["rows"] == N_IMAGES + 2 + 1 + 1 + 3
    return {"out": out, "bundle": hb.bundle, "src": src, "work": work}


@pytest.fixture()
def output(scored, tmp_path):
    """A private copy of the output (verdicts written by one test must not leak into another)."""
    dst = tmp_path / "out"
    shutil.copytree(scored["out"], dst)
    return dst


def _row(store: ReviewStore, **where) -> int:
    df = store.df
    m = np.ones(len(df), bool)
    for k, v in where.items():
        m &= (df[k] == v).to_numpy()
    return int(df.loc[m, "id"].iloc[0])


@needs_data
def test_the_table_filters_sorts_and_pages_a_real_output(output):
    store = ReviewStore(str(output))
    df = store.df
    assert len(df) == N_IMAGES + 7
    assert set(df["kind"].dropna()) == {"image", "volume", "series"}
    f = store.facets()
    assert f["flagged"] == int(((df["label"] == "yes") & df["error"].isna()).sum()) > 0
    assert dict(f["source"])["br35h"] == N_IMAGES and dict(f["source"])["extra.zip"] == 3
    assert f["errors"] == 1

    ids = store.select(Query(sort="score", desc=True))
    s = df.loc[ids, "score"].to_numpy(dtype=float)
    finite = s[np.isfinite(s)]
    assert len(ids) == len(df) and (np.diff(finite) <= 0).all() and np.isnan(s[-1])  # errors last
    assert (df.loc[store.select(Query(flagged=True)), "flagged"]).all()
    assert len(store.select(Query(errors="only"))) == 1
    assert set(df.loc[store.select(Query(q="Y10")), "name"].str[:3]) == {"y10"}
    assert len(store.select(Query(kind="series"))) == 1
    out_scope = store.select(Query(scope="out"))
    assert (df.loc[out_scope, "in_scope"] == False).all()  # noqa: E712
    both = store.select(Query(label="yes", source="br35h", sort="name", desc=False))
    names = df.loc[both, "name"].tolist()
    assert names == sorted(names, key=natural_key) and (df.loc[both, "label"] == "yes").all()
    assert natural_key("y2.jpg") < natural_key("Y10.jpg")
    page = store.table_rows(both[100:200])
    assert len(page) == min(100, max(0, len(both) - 100)) and json.dumps(page)  # JSON-safe (no NaN)


@needs_data
def test_verdicts_are_appended_and_the_latest_one_counts(output):
    store = ReviewStore(str(output))
    a = _row(store, flagged=True)
    b = _row(store, kind="volume")
    store.record(a, "tumour", "clear enhancing lesion", "dr one")
    store.record(b, "unsure", "=HYPERLINK(\"x\")", "dr one")
    store.record(a, "no_tumour", "on second look: vessel", "dr two")
    with pytest.raises(ValueError):
        store.record(a, "maybe", "", "dr one")
    with pytest.raises(ValueError):
        store.record(a, "tumour", "", "  ")
    rows = list(csv.DictReader(open(output / "reviews.csv", encoding="utf-8")))
    assert [r["verdict"] for r in rows] == ["tumour", "unsure", "no_tumour"]
    assert list(rows[0]) == REVIEW_FIELDS
    assert rows[1]["note"].startswith("'=")  # a spreadsheet will not run it
    assert rows[0]["path"] == store.df.at[a, "path"] and rows[0]["reviewer"] == "dr one"
    assert rows[0]["label"] == "yes" and float(rows[0]["score"]) >= 0.5
    again = ReviewStore(str(output))  # a restarted page
    assert again.df.at[a, "verdict"] == "no_tumour" and again.df.at[a, "reviewer"] == "dr two"
    assert again.df.at[b, "verdict"] == "unsure"
    assert [h["verdict"] for h in again.history(a)] == ["tumour", "no_tumour"]
    assert again.facets()["reviewed"] == 2


@needs_data
def test_pictures_and_curve_are_the_batch_runs(output, scored):
    store = ReviewStore(str(output))
    viewer = ScanViewer(store, None, None)
    for kind in ("volume", "series"):
        rid = _row(store, kind=kind)
        c = viewer.curve(rid)
        assert c["consistent"], c  # the recomputed score is the stored one
        assert len(c["indices"]) == store.df.at[rid, "n_slices"] > 8
        assert c["slice"] == store.df.at[rid, "slice"] and c["slice"] in c["indices"]
        other = next(i for i in c["indices"] if i != c["slice"])
        for png in (viewer.image(rid), viewer.overlay(rid), viewer.image(rid, other), viewer.thumbnail(rid)):
            im = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
            assert im.std() > 10, kind  # a picture, not a blank
        assert viewer.image(rid) != viewer.image(rid, other)
    member = _row(store, source="extra.zip")
    assert Image.open(io.BytesIO(viewer.overlay(member))).size == (320, 320)
    assert viewer.curve(member)["consistent"]
    from raytumor.review.scans import Unavailable

    with pytest.raises(Unavailable, match="error row"):
        viewer.image(_row(store, name="broken.jpg"))
    # a file replaced since scoring is said to be, not shown as the run's
    jpg = _row(store, kind="image", source="br35h")
    path = Path(store.df.at[jpg, "path"])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(path, format="JPEG")
    assert not ScanViewer(store, None, None).curve(jpg)["consistent"]


@needs_data
def test_the_export_is_a_manifest_training_reads(output, scored, tmp_path):
    store = ReviewStore(str(output))
    want = {
        _row(store, kind="image", source="br35h", flagged=True): ("no_tumour", "no"),  # a corrected FP
        _row(store, source="extra.zip"): ("tumour", "yes"),
        _row(store, kind="volume"): ("no_tumour", "no"),
        _row(store, kind="series"): ("tumour", "yes"),
        _row(store, kind="image", source="br35h", label="no"): ("unsure", None),
    }
    for rid, (verdict, _) in want.items():
        store.record(rid, verdict, "", "dr test")
    dest = tmp_path / "corr" / "corrections.csv"
    res = subprocess.run(
        [sys.executable, "-m", "raytumor.cli", "review", str(output), "--export", str(dest)],
        env=run_env(tmp_path / "ray"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 reviewed rows" in res.stdout and "1 left out" in res.stdout, res.stdout
    m = pd.read_csv(dest, dtype=str, keep_default_na=False)
    assert list(m.columns[:4]) == ["path", "label", "source", "patient_id"]
    assert len(m) == 4
    by_scored = m.set_index("scored_path")
    for rid, (verdict, label) in want.items():
        p = store.df.at[rid, "path"]
        if label is None:
            assert p not in by_scored.index
            continue
        assert by_scored.at[p, "label"] == label and by_scored.at[p, "verdict"] == verdict
    series_path = store.df.at[_row(store, kind="series"), "path"]
    assert by_scored.at[series_path, "patient_id"].startswith("study-")
    assert len(list((tmp_path / "corr" / "corrections_files").iterdir())) == 3  # member, volume, series

    # What `raytumor train --data corrections.csv --data OTHER` does with it: list, then decode every file.
    listing = list_labelled([str(dest), str(DATA / "navoneel-253")])
    mine = listing.files[listing.files["path"].isin(
        [os.path.abspath(dest.parent / p) if not p.startswith("/") else p for p in m["path"]]
    )]  # fmt: skip
    assert len(mine) == 4 and set(mine["class_name"]) == {"yes", "no"}
    dec = decode_batch({"path": mine["path"].to_numpy(object)}, image_size=96, fingerprints=False)
    assert all(e is None for e in dec["error"]), dec["error"]
    assert all(img.std() > 5 for img in dec["image"])
    # the volume's export is its scored source slice, as decoded from the NIfTI
    vol = _row(store, kind="volume")
    exported = [np.asarray(Image.open(p)) for p in mine["path"] if p.endswith(".png")]
    scan = formats.decode_scan(Path(store.df.at[vol, "path"]).read_bytes())
    k = int(np.flatnonzero(np.asarray(scan.slice_index) == int(store.df.at[vol, "slice"]))[0])
    assert any(a.shape == scan.slices[k].shape and (a == scan.slices[k]).all() for a in exported)


# ----------------------------------------------------------------------------------------------------------
# The server: started as users start it, checked over real HTTP


def _start(output: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    log = open(tmp_path / "review.log", "w+")
    p = subprocess.Popen(
        [sys.executable, "-m", "raytumor.cli", "review", str(output), "--port", "0", "--no-browser", *extra],
        env=run_env(tmp_path / "ray"), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        log.seek(0)
        m = re.search(r"open (http://\S+)", log.read())
        if m:
            url = m.group(1)
            host = url.split("/")[2]
            for _ in range(100):
                try:
                    c = http.client.HTTPConnection(host, timeout=5)
                    c.request("GET", "/healthz")
                    if c.getresponse().status == 200:
                        return p, url
                except OSError:
                    time.sleep(0.1)
        if p.poll() is not None:
            break
        time.sleep(0.2)
    stop_group(p)
    log.seek(0)
    raise AssertionError(f"raytumor review did not start:\n{log.read()[-3000:]}")


def _req(url: str, method: str = "GET", path: str = "/", body: bytes | None = None, headers: dict | None = None):
    host = url.split("/")[2]
    c = http.client.HTTPConnection(host, timeout=30)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    return r.status, r.read(), r


@needs_data
def test_the_server_guards_its_verdicts(output, tmp_path):
    p, url = _start(output, tmp_path)
    try:
        assert _req(url, path="/api/summary")[0] == 200
        # another name for this address (DNS rebinding) is refused
        assert _req(url, path="/api/summary", headers={"Host": "evil.example:80"})[0] == 421
        body = json.dumps({"verdict": "tumour", "reviewer": "x"}).encode()
        j = {"Content-Type": "application/json"}
        assert _req(url, "POST", "/api/rows/3/review", body, {**j, "Origin": "http://evil.example"})[0] == 403
        assert _req(url, "POST", "/api/rows/3/review", body, {"Content-Type": "text/plain"})[0] == 415
        assert _req(url, "POST", "/api/rows/999999/review", body, j)[0] == 404
        assert _req(url, "POST", "/api/rows/3/review", b'{"verdict": "maybe"}', j)[0] == 400
        assert _req(url, "POST", "/api/rows/3/review", b"not json", j)[0] == 400
        assert _req(url, "POST", "/api/rows/3/review", b'{"verdict": "tumour", "note": 5}', j)[0] == 400
        assert _req(url, "POST", "/api/rows/3/review", json.dumps({"verdict": "tumour", "note": "x" * 2001}).encode(), j)[0] == 400
        broken = ReviewStore(str(output)).df.query("name == 'broken.jpg'")["id"].iloc[0]
        st, out, _ = _req(url, "POST", f"/api/rows/{broken}/review", body, j)
        assert st == 400 and "has no score" in json.loads(out)["error"]
        for bad in ("limit=-5", "limit=abc", "limit=5000", "scope=maybe", "errors=x", "sort=bogus", "desc=maybe", "verdict=weird", "nosuch=1"):
            st, out, _ = _req(url, path=f"/api/rows?{bad}")
            assert st == 400 and json.loads(out)["error"], bad
        st, out, _ = _req(url, "POST", "/api/rows/3/review", body, j)
        assert st == 200 and json.loads(out)["record"]["verdict"] == "tumour"
        assert _req(url, path="/static/../store.py")[0] == 404
        log = (tmp_path / "review.log").read_text()
        assert "/api/rows" not in log and "evil" not in log  # nothing from requests in the log
    finally:
        stop_group(p)
    # off loopback only with a token
    res = subprocess.run([sys.executable, "-m", "raytumor.cli", "review", str(output), "--host", "0.0.0.0"],
                         env=run_env(tmp_path / "ray"), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and "--token-file" in res.stderr
    tok = tmp_path / "token"
    tok.write_text("s3cret-token-of-some-length\n")
    p, url = _start(output, tmp_path, "--token-file", str(tok))
    try:
        assert _req(url, path="/api/summary")[0] == 401
        assert _req(url, path="/api/summary", headers={"Authorization": "Bearer s3cret-token-of-some-length"})[0] == 200
        st, _, r = _req(url, path="/?token=s3cret-token-of-some-length")
        assert st == 303 and "HttpOnly" in r.getheader("set-cookie")
        cookie = r.getheader("set-cookie").split(";")[0]
        assert _req(url, path="/api/summary", headers={"Cookie": cookie})[0] == 200
        assert _req(url, path="/?token=wrong-token-wrong-token")[0] == 401
    finally:
        stop_group(p)


# ----------------------------------------------------------------------------------------------------------
# The page in a real browser


def _blank(png: bytes) -> bool:
    im = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    return im.std() < 8


@needs_data
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_the_review_page_in_chromium(output, tmp_path):
    selenium = pytest.importorskip("selenium")
    del selenium
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    shots = Path(os.environ.get("RAYTUMOR_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    p, url = _start(output, tmp_path, "--reviewer", "dr browser")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1600,1000", f"--user-data-dir={tmp_path / 'chrome'}",
              # no network but this server: a page that needed a CDN would break here
              "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):  # fmt: skip
        opts.add_argument(a)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for drivers online
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    wait = WebDriverWait(driver, 60)
    store = ReviewStore(str(output))

    def key(k: str) -> None:  # to whatever has focus, as a person types
        ActionChains(driver).send_keys(k).perform()

    def rows_text() -> str:
        return driver.find_element(By.ID, "range").text

    def loaded(img_id: str) -> bool:
        return driver.execute_script(
            f"const i = document.getElementById('{img_id}'); return i.complete && i.naturalWidth > 0;"
        )

    try:
        driver.get(url)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert rows_text() == f"rows 1–100 of {len(store.df):,}"
        assert len(driver.find_elements(By.CSS_SELECTOR, "tr.row")) == 100
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('img.thumb')].slice(0, 12).every(i => i.complete && i.naturalWidth > 0)"
        ))  # fmt: skip
        table_png = driver.get_screenshot_as_png()
        (shots / "review_table.png").write_bytes(table_png)
        assert not _blank(table_png)

        # filter: label yes, then a path search; the counts are the store's
        Select(driver.find_element(By.ID, "f-label")).select_by_value("yes")
        n_yes = len(store.select(Query(label="yes")))
        wait.until(lambda d: rows_text().endswith(f"of {n_yes:,}"))
        driver.find_element(By.ID, "q").send_keys("y10")
        n_q = len(store.select(Query(label="yes", q="y10")))
        wait.until(lambda d: rows_text().endswith(f"of {n_q:,}") or (n_q == 0 and rows_text() == "0 rows"))
        driver.find_element(By.ID, "clear").click()
        wait.until(lambda d: rows_text().endswith(f"of {len(store.df):,}"))

        # keyboard: flagged only, open the first row, verdicts 1 / 2 / 3 (+ a note) step through the rows
        key("f")
        n_flagged = store.facets()["flagged"]
        wait.until(lambda d: rows_text().endswith(f"of {n_flagged:,}"))
        key(Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "detail").is_displayed())
        wait.until(lambda d: loaded("d-image") and loaded("d-overlay"))
        first = driver.find_element(By.ID, "d-path").text
        key("1")
        wait.until(lambda d: d.find_element(By.ID, "d-path").text != first)
        second = driver.find_element(By.ID, "d-path").text
        key("2")
        wait.until(lambda d: d.find_element(By.ID, "d-path").text != second)
        third = driver.find_element(By.ID, "d-path").text
        key("n")
        key("faint; compare with prior")
        key(Keys.ESCAPE)
        key("3")
        wait.until(lambda d: d.find_element(By.ID, "d-path").text != third)
        key("k")  # back to the third row: its verdict shows
        wait.until(lambda d: d.find_element(By.ID, "d-path").text == third)
        wait.until(lambda d: "unsure" in d.find_element(By.ID, "d-saved").text)

        # a volume: the per-slice curve, one point per scored slice; clicking one shows that slice
        key(Keys.ESCAPE)
        key("f")
        Select(driver.find_element(By.ID, "f-kind")).select_by_value("volume")
        wait.until(lambda d: rows_text().endswith("of 2"))
        driver.find_elements(By.CSS_SELECTOR, "tr.row")[0].click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#d-curve svg rect.hit"))
        vid = int(driver.find_elements(By.CSS_SELECTOR, "tr.row")[0].get_attribute("data-id"))
        hits = driver.find_elements(By.CSS_SELECTOR, "#d-curve svg rect.hit")
        assert len(hits) == len(driver.find_elements(By.CSS_SELECTOR, "#d-curve svg circle"))
        assert len(hits) == store.df.at[vid, "n_slices"]
        assert "lowest slice score over the best run" in driver.find_element(By.ID, "d-curve-note").text
        wait.until(lambda d: loaded("d-image") and loaded("d-overlay"))
        detail_png = driver.get_screenshot_as_png()
        (shots / "review_detail.png").write_bytes(detail_png)
        assert not _blank(detail_png)
        # the pictures themselves are not blank either
        for img_id in ("d-image", "d-overlay"):
            el = driver.find_element(By.ID, img_id)
            assert not _blank(el.screenshot_as_png), img_id
        z3 = hits[3].get_attribute("data-slice")
        hits[3].click()
        wait.until(lambda d: f"slice={z3}" in d.find_element(By.ID, "d-image").get_attribute("src"))
        wait.until(lambda d: loaded("d-image"))
        assert driver.find_element(By.ID, "d-slice").text.startswith(f"(slice {z3}: score ")

        # a narrow window: the detail view lies over the table, which keeps its columns
        driver.set_window_size(1000, 800)
        narrow = driver.get_screenshot_as_png()
        (shots / "review_detail_narrow.png").write_bytes(narrow)
        assert driver.execute_script("return getComputedStyle(document.getElementById('detail')).position") == "fixed"
        table_w = driver.execute_script("return document.getElementById('rows').getBoundingClientRect().width")
        assert table_w > 900, table_w
        driver.set_window_size(1600, 1000)

        # an error row: shown with its reason, and it takes no verdict
        key(Keys.ESCAPE)
        Select(driver.find_element(By.ID, "f-kind")).select_by_value("")
        Select(driver.find_element(By.ID, "f-errors")).select_by_value("only")
        wait.until(lambda d: rows_text().endswith("of 1"))
        driver.find_elements(By.CSS_SELECTOR, "tr.row")[0].click()
        wait.until(lambda d: d.find_element(By.ID, "d-noverdict").is_displayed())
        assert "error:" in driver.find_element(By.ID, "d-image-msg").text
        assert all(not b.is_enabled() for b in driver.find_elements(By.CSS_SELECTOR, "[data-verdict]"))
        key("1")

        # reload: the verdicts are kept (from reviews.csv, not the browser)
        driver.get(url.split("?")[0])
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        Select(driver.find_element(By.ID, "f-verdict")).select_by_value("reviewed")
        wait.until(lambda d: rows_text().endswith("of 3"))
        shown = {e.text for e in driver.find_elements(By.CSS_SELECTOR, "tr.row td:last-child")}
        assert shown == {"confirm tumour", "no tumour", "unsure"}
        # the page fetched nothing from anywhere but this server
        origins = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
        )
        assert set(origins) <= {url.split("?")[0].rstrip("/")}, set(origins)
    finally:
        driver.quit()
        stop_group(p)
    log = list(csv.DictReader(open(output / "reviews.csv", encoding="utf-8")))
    assert [r["verdict"] for r in log] == ["tumour", "no_tumour", "unsure"]
    assert {r["reviewer"] for r in log} == {"dr browser"}
    assert log[2]["note"] == "faint; compare with prior"
    assert [r["path"] for r in log] == [first, second, third]
    # and the export takes them
    res = subprocess.run(
        [sys.executable, "-m", "raytumor.cli", "review", str(output), "--export", str(tmp_path / "c.csv")],
        env=run_env(tmp_path / "ray"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0 and "2 reviewed rows" in res.stdout, res.stdout + res.stderr
    # Parquet by its name, and training's listing reads it
    res = subprocess.run(
        [sys.executable, "-m", "raytumor.cli", "review", str(output), "--export", str(tmp_path / "c.parquet")],
        env=run_env(tmp_path / "ray"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert sorted(pd.read_parquet(tmp_path / "c.parquet")["verdict"]) == ["no_tumour", "tumour"]
    assert sorted(list_labelled(str(tmp_path / "c.parquet")).files["class_name"]) == ["no", "yes"]
    res = subprocess.run(
        [sys.executable, "-m", "raytumor.cli", "review", str(output), "--export", str(tmp_path / "c.txt")],
        env=run_env(tmp_path / "ray"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2 and ".csv or .parquet" in res.stderr


@needs_data
def test_a_bucket_output_is_reviewed_and_exported_in_place(scored, s3_server, s3_client):
    """OUTPUT on s3:// (moto on loopback): rows read, verdicts appended to the bucket's reviews.csv (a bucket
    has no append: the object is rewritten with the line added), the export written beside it."""
    s3_client.create_bucket(Bucket="scores")
    for f in scored["out"].rglob("*"):
        if f.is_file():
            key = f"run/{f.relative_to(scored['out']).as_posix()}"
            s3_client.put_object(Bucket="scores", Key=key, Body=f.read_bytes())
    storage = StorageOptions.from_env(s3_server)
    store = ReviewStore("s3://scores/run", storage)
    assert len(store.df) == N_IMAGES + 7
    z, j = _row(store, source="extra.zip"), _row(store, kind="image", source="br35h", flagged=True)
    store.record(z, "tumour", "", "dr s3")
    store.record(j, "no_tumour", "", "dr s3")
    text = s3_client.get_object(Bucket="scores", Key="run/reviews.csv")["Body"].read().decode()
    assert text.startswith("reviewed_at,") and text.count("\n") == 3
    again = ReviewStore("s3://scores/run", storage)
    assert again.df.at[z, "verdict"] == "tumour" and again.df.at[j, "verdict"] == "no_tumour"
    res = export_corrections(again, ScanViewer(again, None, storage), "s3://scores/corrections.csv", storage)
    assert res["rows"] == 2 and res["files_written"] == 1 and not res["left_out"]
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="scores")["Contents"]}
    assert "corrections.csv" in keys and sum(k.startswith("corrections_files/") for k in keys) == 1
    listing = list_labelled("s3://scores/corrections.csv", storage)
    assert sorted(listing.files["class_name"]) == ["no", "yes"]
