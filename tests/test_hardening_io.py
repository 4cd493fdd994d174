"""Issue 14, storage and archives: transient storage faults are retried and never become error rows (a real
S3-compatible server, stopped and restarted), zip archives stay open per worker, zip member names decode as
their writer meant, and archive members are bounded by inflated bytes and compression ratio."""

from __future__ import annotations

import bz2
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raytumor.score import decode
from raytumor.storage import StorageOptions, list_units

MiB = 1 << 20


def _png(seed: int = 0, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _close_archives() -> None:
    getattr(decode, "close_archives", lambda: None)()


def _batch(units: pd.DataFrame) -> dict[str, np.ndarray]:
    return {c: units[c].to_numpy() for c in ("id", "source", "member", "member_n", "kind", "size")}


def _decode(units: pd.DataFrame, storage: StorageOptions | None = None, **kw: object) -> list[dict]:
    """Rows of one read/decode task over ``units`` (as a Ray Data task would run it)."""
    out: list[dict] = []
    for cols in decode.read_decode_task(
        _batch(units),
        image_size=32,
        storage=storage,
        max_file_bytes=2 << 30,
        min_foreground=0.0,
        done_ids=None,
        listing_errors={},
        **kw,
    ):
        out += [{"path": p, "error": e} for p, e in zip(cols["path"], cols["error"], strict=True)]
    return out


# ----------------------------------------------------------------------------------------------------------
# Defect 3: transient storage errors are retried, then left unscored (no row), never turned into error rows


def test_transient_and_permanent_storage_errors_are_told_apart():
    from raytumor.storage import is_transient

    transient = [
        OSError(
            "When reading information for key 'k/a.jpg' in bucket 'b': AWS Error NETWORK_CONNECTION during "
            "HeadObject operation: curlCode: 7, Could not connect to server"
        ),
        OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."),
        OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation: Service Unavailable"),
        OSError("AWS Error THROTTLING during ListObjectsV2 operation: Rate exceeded"),
        OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 28, Timeout was reached"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),
    ]
    permanent = [
        FileNotFoundError(2, "Path does not exist 'b/k/503.jpg'"),
        zipfile.BadZipFile("Bad CRC-32 for file 'a.png'"),
        OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"),
        OSError("When reading information for key 'k/timed out 503 SlowDown.jpg': AWS Error NO_SUCH_KEY"),
        ValueError("not an image"),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
    wrapped = RuntimeError("decoder failed")
    wrapped.__cause__ = transient[0]
    assert is_transient(wrapped)


def test_retrier_backs_off_then_gives_up_and_fails_fast_while_storage_is_down():
    from raytumor.storage import Retrier, StorageUnreachable

    waits: list[float] = []
    r = Retrier(attempts=4, backoff_s=1.0, sleep=waits.append)
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    assert r.call(flaky) == "ok" and calls["n"] == 3
    assert len(waits) == 2 and 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0  # exponential, jittered

    def dead() -> None:
        calls["n"] += 1
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7")

    calls["n"], waits[:] = 0, []
    with pytest.raises(StorageUnreachable, match="after 4 tries"):
        r.call(dead)
    assert calls["n"] == 4 and len(waits) == 3 and r.down
    calls["n"] = 0
    with pytest.raises(StorageUnreachable):
        r.call(dead)
    assert calls["n"] == 1  # storage known down: one try per read, not another backoff cycle
    assert r.call(lambda: 1) == 1 and not r.down  # it answered: full tries again

    def corrupt() -> None:
        calls["n"] += 1
        raise zipfile.BadZipFile("File is not a zip file")

    calls["n"] = 0
    with pytest.raises(zipfile.BadZipFile):
        r.call(corrupt)
    assert calls["n"] == 1  # permanent: never retried


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Moto:
    """A moto S3 server this test may stop and start again on the same port (its objects are in memory, so
    a restart is a server that came back: the test puts the same objects again)."""

    def __init__(self) -> None:
        pytest.importorskip("moto")
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.fail("moto server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None

    def client(self):  # noqa: ANN201
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


@pytest.fixture()
def moto():
    m = _Moto()
    m.start()
    yield m
    m.stop()


def _s3_input(moto: _Moto, phantoms: Path | None = None) -> dict[str, bytes]:
    """Objects of a small archive: 6 images, a zip with 3 members, a tar.gz with 2; returns key -> bytes."""
    c = moto.client()
    c.create_bucket(Bucket="scans")
    if phantoms is not None:
        files = sorted((phantoms / "yes").iterdir())[:3] + sorted((phantoms / "no").iterdir())[:3]
        images = [p.read_bytes() for p in files]
    else:
        images = [_png(i) for i in range(6)]
    objects = {f"in/img{i}.png": b for i, b in enumerate(images)}
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        for i in range(3):
            z.writestr(f"z/m{i}.png", images[i])
    objects["in/batch.zip"] = zbuf.getvalue()
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as t:
        for i in range(2):
            info = tarfile.TarInfo(f"t/m{i}.png")
            info.size = len(images[3 + i])
            t.addfile(info, io.BytesIO(images[3 + i]))
    objects["in/more.tar.gz"] = tbuf.getvalue()
    for k, v in objects.items():
        c.put_object(Bucket="scans", Key=k, Body=v)
    return objects


def _retry_env(monkeypatch: pytest.MonkeyPatch, attempts: int, backoff_s: float) -> None:
    monkeypatch.setenv("RAYTUMOR_READ_ATTEMPTS", str(attempts))
    monkeypatch.setenv("RAYTUMOR_READ_BACKOFF_S", str(backoff_s))


def test_stopped_s3_server_leaves_units_unscored_and_they_are_read_once_it_is_back(moto, monkeypatch):
    """Read tasks against a real S3 server that is stopped after listing: no row at all (not an error row)
    for any unit, each reported unreachable; after a restart the same units all decode."""
    _s3_input(moto)
    _retry_env(monkeypatch, 3, 0.01)
    storage = StorageOptions.from_env(moto.endpoint)
    units = list_units("s3://scans/in", storage).table
    assert len(units) == 6 + 3 + 1
    moto.stop()
    _close_archives()
    task = decode.ReadDecode(32, storage, 2 << 30, 0.0)
    t0 = time.time()
    rows = [p for cols in task(_batch(units)) for p in cols["path"]]
    assert rows == []  # nothing written: the old code wrote 10 "unreadable: OSError ..." rows
    assert sorted(task.unreachable) == sorted(units["id"])
    assert task.retry.retries == 2  # one backoff cycle (3 tries), then one try per unit while down
    assert time.time() - t0 < 30
    moto.start()
    _s3_input(moto)
    again = decode.ReadDecode(32, storage, 2 << 30, 0.0)
    cols = list(again(_batch(units)))
    paths = [p for c in cols for p in c["path"]]
    errors = [e for c in cols for e in c["error"]]
    tar = "s3://scans/in/more.tar.gz"
    expected = set(units["id"]) - {tar} | {f"{tar}!t/m0.png", f"{tar}!t/m1.png"}
    assert sorted(paths) == sorted(expected) and errors == [None] * len(expected)
    assert again.unreachable == []
    _close_archives()


def test_listing_keeps_unreachable_archives_out_of_error_rows(moto, monkeypatch):
    """A zip whose central directory cannot be fetched (storage down) is not a "corrupt zip archive"."""
    _s3_input(moto)
    _retry_env(monkeypatch, 2, 0.01)
    storage = StorageOptions.from_env(moto.endpoint)
    import raytumor.storage as st

    real = st._zip_members

    def down(*a: object) -> list[dict]:
        raise OSError(
            "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Could not connect"
        )

    monkeypatch.setattr(st, "_zip_members", down)
    units = list_units("s3://scans/in", storage)
    assert units.error_rows == [] and units.unreachable == ["s3://scans/in/batch.zip"]
    monkeypatch.setattr(st, "_zip_members", real)
    assert len(list_units("s3://scans/in", storage).table) == 10


class _FlakyStream:
    """A raw stream that fails with a network error after ``fail_after`` bytes (``times`` times)."""

    state = {"opens": 0, "fail_opens": 1, "fail_after": 0}

    def __init__(self, data: bytes) -> None:
        self.buf = io.BytesIO(data)
        _FlakyStream.state["opens"] += 1
        self.fail = _FlakyStream.state["opens"] <= _FlakyStream.state["fail_opens"]

    def read(self, n: int = -1) -> bytes:
        if self.fail and self.buf.tell() >= _FlakyStream.state["fail_after"]:
            raise OSError(
                "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, Recv failure"
            )
        return self.buf.read(n)

    def __enter__(self) -> _FlakyStream:
        return self

    def __exit__(self, *a: object) -> None:
        pass


def test_tar_stream_cut_by_the_network_is_restreamed_without_duplicates(monkeypatch, tmp_path):
    images = [_png(i) for i in range(5)]
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w") as t:
        for i, b in enumerate(images):
            info = tarfile.TarInfo(f"t/m{i}.png")
            info.size = len(b)
            t.addfile(info, io.BytesIO(b))
    data = tbuf.getvalue()

    class FS:
        def open_input_stream(self, path: str, compression: object = None) -> _FlakyStream:
            return _FlakyStream(data)

    monkeypatch.setattr(decode, "get_filesystem", lambda *a, **k: (FS(), "x.tar"), raising=True)
    units = pd.DataFrame(
        [{"id": "x.tar", "source": "x.tar", "member": None, "member_n": 1, "kind": "tar", "size": len(data)}]
    )
    _retry_env(monkeypatch, 3, 0.0)
    storage = StorageOptions.from_env()
    _FlakyStream.state.update(opens=0, fail_opens=1, fail_after=len(data) // 2)
    rows = _decode(units, storage)
    assert sorted(r["path"] for r in rows) == [f"x.tar!t/m{i}.png" for i in range(5)]
    assert all(r["error"] is None for r in rows) and _FlakyStream.state["opens"] == 2
    # Down for good: the members read stand, the rest have no row, and the archive gets no error row.
    _FlakyStream.state.update(opens=0, fail_opens=99, fail_after=len(data) // 2)
    task = decode.ReadDecode(32, storage, 2 << 30, 0.0)
    rows = [(p, e) for c in task(_batch(units)) for p, e in zip(c["path"], c["error"], strict=True)]
    assert 0 < len(rows) < 5 and all(e is None for _, e in rows) and "x.tar" not in dict(rows)
    assert task.unreachable == ["x.tar"] and _FlakyStream.state["opens"] == 3


@pytest.mark.ray
def test_score_job_exits_non_zero_and_the_same_command_finishes_every_input(
    ray_session, head_bundle, phantoms, moto, tmp_path, monkeypatch, capsys
):
    """The whole job against a real S3 server stopped right after listing: exit 75 with the count, no rows
    for those inputs; the server comes back, the same command scores each input exactly once."""
    from raytumor.results import read_scores
    from raytumor.score import job

    _s3_input(moto, phantoms)
    _retry_env(monkeypatch, 2, 0.05)
    out = tmp_path / "out"
    argv = ["--bundle", str(head_bundle.bundle), "--input", "s3://scans/in", "--output", str(out)]
    argv += ["--s3-endpoint", moto.endpoint]
    real_resources = job.predictor_resources

    def stop_after_listing() -> dict:
        moto.stop()  # the listing is done: every read from here on meets a dead server
        return real_resources()

    monkeypatch.setattr(job, "predictor_resources", stop_after_listing)
    with pytest.raises(SystemExit) as exit_:
        job.main(job.get_args_parser().parse_args(argv))
    assert exit_.value.code == job.EXIT_RETRY
    err = capsys.readouterr().err
    assert "10 inputs could not be read because storage was unreachable" in err
    assert "run the same command again" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unreachable"] == 10 and summary["rows"] == 0 and summary["errors"] == 0
    monkeypatch.setattr(job, "predictor_resources", real_resources)
    moto.start()
    _s3_input(moto, phantoms)
    s = job.main(job.get_args_parser().parse_args(argv))
    assert s["unreachable"] == 0 and s["missing_rows"] == 0
    df = read_scores(str(out))
    tar = "s3://scans/in/more.tar.gz"
    assert len(df) == 11 and df["path"].is_unique and df["error"].isna().all()
    assert {f"{tar}!t/m0.png", f"{tar}!t/m1.png", "s3://scans/in/batch.zip!z/m2.png"} <= set(df["path"])
    _close_archives()


# ----------------------------------------------------------------------------------------------------------
# Defect 7: a zip's central directory is read once per archive per reader (worker process), not per batch


def test_zip_central_directory_is_read_once_per_archive_per_reader(tmp_path, monkeypatch):
    _close_archives()
    images = [_png(i, 32) for i in range(8)]
    zpath = tmp_path / "many.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for i in range(100):
            z.writestr(f"s/{i:03d}.png", images[i % 8])
        z.writestr("s/notes.txt", b"not a scan")
    units = list_units(str(zpath)).table
    reads = {"n": 0}
    real = zipfile.ZipFile._RealGetContents

    def counting(self: zipfile.ZipFile) -> None:
        reads["n"] += 1
        real(self)

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", counting)
    rows: list[dict] = []
    for s in range(0, len(units), 32):  # four 32-unit blocks: four Ray Data tasks in one worker
        rows += _decode(units.iloc[s : s + 32])
    assert reads["n"] == 1  # the old code read it once per block (4)
    assert sorted(r["path"] for r in rows) == sorted(units["id"]) and len(rows) == 101
    assert [r["error"] for r in rows if r["path"].endswith(".png")] == [None] * 100
    assert next(r["error"] for r in rows if r["path"].endswith("notes.txt")).startswith("unknown format")
    # A changed archive (new size/mtime) is opened again, not served from the stale directory.
    time.sleep(0.01)
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("s/000.png", images[1])
    os.utime(zpath, (time.time() + 5, time.time() + 5))
    assert [r["error"] for r in _decode(units.iloc[:1])] == [None] and reads["n"] == 2
    gone = _decode(units.iloc[1:2])
    assert gone[0]["error"].startswith("unreadable")  # the member is no longer there: a permanent error
    held = list(decode._ZIPS.values())
    decode.close_archives()
    assert held and all(oz.file.closed for oz in held) and not decode._ZIPS


# ----------------------------------------------------------------------------------------------------------
# Defect 8: member names as their writer meant them


def _handmade_zip(entries: list[tuple[bytes, bytes, int, bytes]]) -> bytes:
    """A zip written byte by byte: (stored name bytes, data, general purpose flags, central extra field),
    stored, made by Unix (as Info-ZIP on Linux writes it)."""
    out, central = io.BytesIO(), io.BytesIO()
    for name, data, flags, extra in entries:
        offset, crc = out.tell(), zlib.crc32(data)
        out.write(struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, flags, 0, 0, 0, crc, len(data), len(data),
                              len(name), len(extra)))  # fmt: skip
        out.write(name + extra + data)
        central.write(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 0x031E, 20, flags, 0, 0, 0, crc, len(data),
                                  len(data), len(name), len(extra), 0, 0, 0, 0o100644 << 16, offset))  # fmt: skip
        central.write(name + extra)
    cd = central.getvalue()
    eocd = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(cd), out.tell(), 0)
    return out.getvalue() + cd + eocd


def _unicode_path(name: str, stored: bytes, crc: int | None = None) -> bytes:
    body = b"\x01" + struct.pack("<I", zlib.crc32(stored) if crc is None else crc) + name.encode()
    return struct.pack("<2H", 0x7075, len(body)) + body


def test_zip_member_names_decode_as_the_writer_meant(tmp_path):
    _close_archives()
    img = _png(3, 32)
    latin1 = "tümör-Ä.png".encode("latin-1")  # not UTF-8: only the 0x7075 field says what it is
    entries = [
        ("a/tümör-flag.png".encode(), img, 0x800, b""),  # flag bit 11: UTF-8
        (latin1, img, 0, _unicode_path("a/tümör-extra.png", latin1)),  # Info-ZIP Unicode Path field
        ("a/tümör-infozip.png".encode(), img, 0, b""),  # Info-ZIP/macOS: UTF-8 bytes, no flag, no field
        (b"a/\x81ber-cp437.png", img, 0, b""),  # a DOS name: cp437
        (b"a/stale-\x81.png", img, 0, _unicode_path("a/wrong.png", b"a/other.png")),  # CRC mismatch: ignored
    ]
    zpath = tmp_path / "names.zip"
    zpath.write_bytes(_handmade_zip(entries))
    assert zipfile.ZipFile(zpath).testzip() is None
    want = [
        "a/tümör-flag.png",
        "a/tümör-extra.png",
        "a/tümör-infozip.png",
        "a/über-cp437.png",
        "a/stale-ü.png",
    ]
    units = list_units(str(zpath)).table
    assert sorted(units["member"]) == sorted(want)
    rows = _decode(units)
    assert sorted(r["path"] for r in rows) == sorted(f"{zpath}!{n}" for n in want)
    assert [r["error"] for r in rows] == [None] * 5  # each row is its member, decoded
    _close_archives()


def test_zip_written_by_info_zip_keeps_its_names(tmp_path):
    import shutil

    if shutil.which("zip") is None:
        pytest.skip("Info-ZIP zip is not installed")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "tümör_é.png").write_bytes(_png(5, 32))
    zpath = tmp_path / "info.zip"
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    subprocess.run(["zip", "-q", "-r", str(zpath), "d"], cwd=src, env=env, check=True)
    units = list_units(str(zpath)).table
    assert list(units["member"]) == ["d/tümör_é.png"]
    assert [r["error"] for r in _decode(units)] == [None]
    _close_archives()


# ----------------------------------------------------------------------------------------------------------
# Defect 4 (archives): members are bounded by inflated bytes and ratio, declared and actual


def _peak(fn):  # noqa: ANN001, ANN202
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_zip_bomb_is_refused_from_its_central_directory_before_inflating(tmp_path, monkeypatch):
    _close_archives()
    zpath = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("ok.png", _png(1, 32))
        z.writestr("bomb.nii", bytes(96 * MiB))  # ~100 KB compressed: ~1000:1
    units = list_units(str(zpath)).table
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self: zipfile.ZipFile, name: object, *a: object, **k: object) -> object:
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    rows, peak = _peak(lambda: {r["path"].split("!")[1]: r["error"] for r in _decode(units)})
    assert rows["ok.png"] is None
    assert rows["bomb.nii"].startswith("decompression bomb: member declares") and "100:1" in rows["bomb.nii"]
    assert opened == ["ok.png"] and peak < 16 * MiB  # never inflated (the old code held all 96 MiB)
    # Over the inflated-bytes limit (declared), whatever the ratio:
    big = _decode(units[units["member"] == "ok.png"], max_inflated_bytes=1000)
    assert big[0]["error"].startswith("too large: member declares")
    _close_archives()


def _patch_declared_size(data: bytes, name: bytes, size: int) -> bytes:
    """Rewrite the uncompressed size a zip declares for ``name`` (local header and central directory)."""
    buf = bytearray(data)
    for sig, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = buf.find(sig)
        while i >= 0:
            hdr = 30 if sig == b"PK\x03\x04" else 46
            n = struct.unpack_from("<H", buf, i + (26 if hdr == 30 else 28))[0]
            if bytes(buf[i + hdr : i + hdr + n]) == name:
                struct.pack_into("<I", buf, i + at, size)
            i = buf.find(sig, i + 4)
    return bytes(buf)


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2])
def test_zip_member_lying_about_its_size_is_stopped_while_inflating(tmp_path, method):
    _close_archives()
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", method) as z:
        z.writestr("liar.nii", bytes(64 * MiB))
        z.writestr("ok.png", _png(2, 32))
    zpath = tmp_path / "liar.zip"
    zpath.write_bytes(_patch_declared_size(zbuf.getvalue(), b"liar.nii", 1000))  # "1000 bytes"
    units = list_units(str(zpath)).table
    rows, peak = _peak(lambda: {r["path"].split("!")[1]: r["error"] for r in _decode(units)})
    assert rows["ok.png"] is None
    # deflate: zipfile stops at the declared size, the CRC then fails; bzip2: the actual ratio gives it away
    want = "unreadable: BadZipFile" if method == zipfile.ZIP_DEFLATED else "decompression bomb: member"
    assert rows["liar.nii"].startswith(want)
    assert peak < 24 * MiB  # the old code inflated the whole 64 MiB (bzip2: in one call) before noticing
    _close_archives()


def _tar(mode: str, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tar_units(path: Path) -> pd.DataFrame:
    return pd.DataFrame(
        [{"id": str(path), "source": str(path), "member": None, "member_n": 1, "kind": "tar",
          "size": path.stat().st_size}]
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2"])
def test_tar_bomb_member_is_refused_with_bounded_memory(tmp_path, mode):
    path = tmp_path / f"bomb.tar.{mode[2:]}"
    ok = _png(4, 32)
    path.write_bytes(_tar(mode, [("a/ok.png", ok), ("a/bomb.nii", bytes(64 * MiB)), ("a/after.png", ok)]))
    rows, peak = _peak(lambda: {r["path"]: r["error"] for r in _decode(_tar_units(path))})
    assert rows[f"{path}!a/ok.png"] is None
    assert rows[f"{path}!a/bomb.nii"].startswith("decompression bomb")
    # nothing past a bomb is read: the archive says so in its own row, so no unit is silently lost
    assert rows[str(path)].startswith("decompression bomb") and f"{path}!a/after.png" not in rows
    assert peak < 24 * MiB  # the old code held the 64 MiB member (bzip2: inflated in one read, then copied)


def test_tar_member_over_the_inflated_limit_is_skipped_and_the_rest_scored(tmp_path):
    path = tmp_path / "big.tar.gz"
    ok = _png(6, 32)
    noise = np.random.default_rng(0).integers(0, 255, 3 * MiB, dtype=np.uint8).tobytes()  # ratio ~1
    path.write_bytes(_tar("w:gz", [("a/big.nii", noise), ("a/ok.png", ok)]))
    rows = {r["path"]: r["error"] for r in _decode(_tar_units(path), max_inflated_bytes=2 * MiB)}
    assert rows[f"{path}!a/big.nii"].startswith("too large: member declares")
    assert rows[f"{path}!a/ok.png"] is None and str(path) not in rows


def test_plain_and_compressed_tars_decode_alike(tmp_path):
    members = [(f"x/{i}.png", _png(i, 32)) for i in range(4)]
    got = {}
    for mode, suffix in (("w", "tar"), ("w:gz", "tar.gz"), ("w:bz2", "tar.bz2"), ("w:xz", "tar.xz")):
        path = tmp_path / f"a.{suffix}"
        path.write_bytes(_tar(mode, members))
        rows = _decode(_tar_units(path))
        got[suffix] = sorted((r["path"].split("!")[1], r["error"]) for r in rows)
    assert all(v == [(n, None) for n, _ in members] for v in got.values())
    # concatenated gzip streams (pigz --independent, appended archives) read on
    path = tmp_path / "cat.tar.gz"
    raw = _tar("w", members)
    half = len(raw) // 1024 // 2 * 1024
    path.write_bytes(_gz(raw[:half]) + _gz(raw[half:]))
    assert sorted(r["path"].split("!")[1] for r in _decode(_tar_units(path))) == [n for n, _ in members]


def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def test_truncated_bzip2_tar_gets_one_archive_row(tmp_path):
    members = [(f"x/{i}.png", _png(i, 64)) for i in range(6)]
    data = bz2.compress(_tar("w", members))
    path = tmp_path / "cut.tar.bz2"
    path.write_bytes(data[: len(data) * 2 // 3])
    rows = {r["path"]: r["error"] for r in _decode(_tar_units(path))}
    assert rows[str(path)].startswith(("truncated or corrupt tar archive", "corrupt tar archive"))
