"""What the review page shows and keeps: a finished score output's rows, the filters and sort over them, and
the append-only verdict log ``OUTPUT/reviews.csv``.

No model and no Ray here: the table of a 100k-row output is pandas in memory (a few tens of MB), and the
page asks for one page of rows at a time, so the browser never holds the whole output.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from raytumor.ingest import is_negative_name
from raytumor.results import OUT_OF_SCOPE, RUN_FILE, json_value, read_scores
from raytumor.storage import (
    MEMBER_SEP,
    StorageOptions,
    archive_kind,
    get_filesystem,
    is_manifest,
    join,
    read_manifest,
    read_text,
)

REVIEWS_FILE = "reviews.csv"
REVIEW_FIELDS = ["reviewed_at", "reviewer", "path", "verdict", "note", "label", "score", "bundle_id"]
# Verdict code -> what the page's button says.
VERDICTS = {"tumour": "confirm tumour", "no_tumour": "no tumour", "unsure": "unsure"}
MAX_NOTE = 2000
MAX_REVIEWER = 100
# Columns the table sorts and filters on; the detail view gets the whole row.
TABLE_COLUMNS = [
    "id", "name", "path", "kind", "score", "label", "view", "in_scope", "scope_reason", "source", "error",
    "slice", "n_slices", "flagged", "verdict", "reviewer", "note", "reviewed_at",
]  # fmt: skip
SORTABLE = {"id", "name", "kind", "score", "label", "view", "in_scope", "source", "error", "verdict", "reviewed_at"}


def _text(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and not np.isfinite(v)) or v is pd.NA or v is pd.NaT:
        return None
    return str(v)


def _clean(text: str) -> str:
    """One line of printable text: control characters (NUL, newlines...) become spaces, runs collapse."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())


def _safe_cell(text: str) -> str:
    """A free-text cell a spreadsheet will not run as a formula (CSV injection): a leading = + - @ gets '."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# ----------------------------------------------------------------------------------------------------------
# The verdict log


class ReviewLog:
    """``OUTPUT/reviews.csv``: one line per verdict (who, when, what), never rewritten in place locally.

    A later line for the same path supersedes an earlier one (the page shows the latest; the history stays).
    Local files are appended under an exclusive ``flock``, so two review servers on one output interleave
    whole lines; a bucket has no append, so the object is rewritten with the line added (one reviewer per
    bucket output at a time)."""

    def __init__(self, output: str, storage: StorageOptions | None) -> None:
        self.uri = join(output, REVIEWS_FILE)
        self.storage = storage
        self.local = "://" not in self.uri
        self._lock = threading.Lock()

    def read(self) -> pd.DataFrame:
        text = read_text(self.uri, self.storage)
        if not text:
            return pd.DataFrame(columns=REVIEW_FIELDS)
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        for c in REVIEW_FIELDS:
            if c not in df.columns:
                df[c] = ""
        return df[df["verdict"].isin(list(VERDICTS))].reset_index(drop=True)

    def append(self, record: dict[str, Any]) -> None:
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow([record.get(k, "") for k in REVIEW_FIELDS])
        with self._lock:
            if self.local:
                self._append_local(line.getvalue())
            else:
                self._append_bucket(line.getvalue())

    def _header(self) -> str:
        return ",".join(REVIEW_FIELDS) + "\n"

    def _append_local(self, line: str) -> None:
        import fcntl

        os.makedirs(os.path.dirname(os.path.abspath(self.uri)), exist_ok=True)
        with open(self.uri, "a", encoding="utf-8", newline="") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if f.tell() == 0:
                    f.write(self._header())
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _append_bucket(self, line: str) -> None:
        fs, path = get_filesystem(self.uri, self.storage)
        old = b""
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as f:
                old = f.read()
        if not old:
            old = self._header().encode()
        elif not old.endswith(b"\n"):
            old += b"\n"
        with fs.open_output_stream(path) as f:
            f.write(old + line.encode())


# ----------------------------------------------------------------------------------------------------------
# The rows


@dataclass
class Query:
    """The table's filters and sort (the page's controls, as URL query parameters)."""

    q: str = ""  # substring of the path, case-insensitive
    label: str = ""
    view: str = ""
    source: str = ""
    kind: str = ""
    scope: str = ""  # "in" | "out" | ""
    errors: str = ""  # "only" | "none" | ""
    verdict: str = ""  # a verdict code | "reviewed" | "unreviewed" | ""
    flagged: bool = False
    sort: str = "score"
    desc: bool = True
    offset: int = 0
    limit: int = 100

    @classmethod
    def from_params(cls, p: dict[str, str]) -> Query:
        """The query from URL parameters; a value the page never sends is a ValueError (400), not ignored."""

        def flag(name: str, default: bool) -> bool:
            v = p.get(name)
            if v is None:
                return default
            if v.lower() not in ("1", "0", "true", "false"):
                raise ValueError(f"{name} must be 1 or 0, not {v!r}")
            return v.lower() in ("1", "true")

        def num(name: str, default: int, lo: int, hi: int) -> int:
            v = p.get(name)
            if v is None:
                return default
            if not v.isdigit() or not lo <= int(v) <= hi:
                raise ValueError(f"{name} must be a whole number from {lo} to {hi}, not {v!r}")
            return int(v)

        def one_of(name: str, allowed: tuple[str, ...]) -> str:
            v = p.get(name, "")
            if v not in allowed:
                names = ", ".join(a or "(empty)" for a in allowed)
                raise ValueError(f"{name} must be one of {names}, not {v!r}")
            return v

        unknown = set(p) - {f for f in cls.__dataclass_fields__} - {"row", "token"}
        if unknown:
            raise ValueError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
        return cls(
            q=p.get("q", "")[:500], label=p.get("label", ""), view=p.get("view", ""), source=p.get("source", ""),
            kind=p.get("kind", ""), scope=one_of("scope", ("", "in", "out")),
            errors=one_of("errors", ("", "only", "none")),
            verdict=one_of("verdict", ("", "reviewed", "unreviewed", *VERDICTS)), flagged=flag("flagged", False),
            sort=one_of("sort", ("", *sorted(SORTABLE))) or "score", desc=flag("desc", True),
            offset=num("offset", 0, 0, 1 << 40), limit=num("limit", 100, 1, 1000),
        )  # fmt: skip


def row_source(path: str, root: str, manifest_sources: dict[str, str] | None = None) -> str:
    """Where a row came from, for filtering and the corrections' ``source``: a manifest's own ``source``
    value; else the archive a member is in; else the first folder under the scored input (the input's own
    name for files directly in it)."""
    if manifest_sources and path in manifest_sources:
        return manifest_sources[path]
    cut = path.split("#series-", 1)[0]
    i = cut.find(MEMBER_SEP)
    while i > 0 and not archive_kind(cut[:i]):
        i = cut.find(MEMBER_SEP, i + 1)
    if i > 0:
        return posixpath.basename(cut[:i])
    root = root.rstrip("/")
    if root and cut.startswith(root + "/"):
        rel = cut[len(root) + 1 :]
        return rel.split("/", 1)[0] if "/" in rel else posixpath.basename(root) or root
    return posixpath.basename(posixpath.dirname(cut)) or cut


def natural_key(text: str) -> str:
    """A sort key that orders names as people read them: case-insensitive, ``y2`` before ``y10``."""
    return re.sub(r"\d+", lambda m: m.group(0).rjust(12, "0"), text.lower())


def display_name(path: str) -> str:
    """A short name for the table: an archive member's name, a series' folder + hash, a file's base name."""
    if "#series-" in path:
        folder, h = path.split("#series-", 1)
        return f"{posixpath.basename(folder.rstrip('/'))} · series {h[:10]}"
    return posixpath.basename(path.split(MEMBER_SEP)[-1]) or path


class ReviewStore:
    """A finished score output's rows (``OUTPUT/scores``) with their latest verdicts, and the log."""

    def __init__(
        self, output: str, storage: StorageOptions | None = None, negative_class: str | None = None
    ) -> None:
        self.output = output.rstrip("/") if "://" in output else os.path.abspath(output)
        self.storage = storage
        run_text = read_text(join(self.output, RUN_FILE), storage)
        if run_text is None:
            raise FileNotFoundError(f"{output} is not a raytumor score output (no {RUN_FILE})")
        self.run: dict[str, Any] = json.loads(run_text)
        self.config: dict[str, Any] = self.run.get("config") or {}
        df = read_scores(self.output, storage, skip_unreadable=True)
        if df.empty:
            raise ValueError(f"{output} holds no score rows yet (is the run still starting?)")
        df = df.sort_values("path", kind="stable", ignore_index=True)
        df.insert(0, "id", np.arange(len(df), dtype=np.int64))
        src_root = str(self.run.get("input") or "")
        manifest_sources, self.manifest_patients = self._manifest_columns(src_root)
        root = "" if is_manifest(src_root) else src_root
        df["source"] = [row_source(p, root, manifest_sources) for p in df["path"]]
        df["name"] = [display_name(p) for p in df["path"]]
        df["name_key"] = [natural_key(n) for n in df["name"]]
        self.classes = [c[len("prob_") :] for c in df.columns if c.startswith("prob_")]
        err = df["error"].astype(object)
        df["has_error"] = err.notna() & (err.astype(str) != "")
        for c in ("view", "scope_reason", "kind", "label", "error"):
            if c not in df.columns:
                df[c] = None
        self.df = df
        self.set_negative_class(negative_class)
        self.by_path = dict(zip(df["path"], df["id"], strict=True))
        self.log = ReviewLog(self.output, storage)
        self._lock = threading.Lock()
        self._apply_reviews(self.log.read())

    def set_negative_class(self, negative_class: str | None) -> None:
        """The bundle's negative class (else guessed from the class names), and what it makes flagged: the
        bundle called a tumour (a class other than the negative one, in scope, no error)."""
        self.negative_class = negative_class if negative_class in self.classes else self._negative_class()
        lab = self.df["label"].astype(object)
        self.df["flagged"] = lab.notna() & ~lab.isin([OUT_OF_SCOPE, self.negative_class]) & ~self.df["has_error"]

    def _negative_class(self) -> str | None:
        found = [c for c in self.classes if is_negative_name(c)]
        return found[0] if len(found) == 1 else None

    def _manifest_columns(self, src: str) -> tuple[dict[str, str] | None, dict[str, str]]:
        """A scored manifest's own ``source`` and ``patient_id`` per path (unreadable now: none)."""
        if not src or not is_manifest(src):
            return None, {}
        try:
            m = read_manifest(src, self.storage)
        except Exception:
            return None, {}
        out_s = dict(zip(m["path"], m["source"].astype(str), strict=True)) if "source" in m.columns else None
        pats = {}
        if "patient_id" in m.columns:
            pats = {p: str(v) for p, v in zip(m["path"], m["patient_id"], strict=True) if _text(v)}
        return out_s, pats

    def _apply_reviews(self, log: pd.DataFrame) -> None:
        df = self.df
        for c in ("verdict", "reviewer", "note", "reviewed_at"):
            df[c] = None
        if log.empty:
            return
        latest = log.drop_duplicates("path", keep="last")
        latest = latest[latest["path"].isin(self.by_path)]
        ids = latest["path"].map(self.by_path).to_numpy()
        for c in ("verdict", "reviewer", "note", "reviewed_at"):
            df.loc[ids, c] = latest[c].to_numpy()

    # ------------------------------------------------------------------------------------------------------

    def facets(self) -> dict[str, Any]:
        """Values the page's filter menus offer, with counts."""
        df = self.df

        def counts(col: str) -> list[list[Any]]:
            vc = df[col].astype(object).where(df[col].notna(), "(none)").astype(str).value_counts()
            return [[k, int(v)] for k, v in vc.items()]

        return {
            "label": counts("label"), "view": counts("view"), "source": counts("source"), "kind": counts("kind"),
            "total": len(df), "flagged": int(df["flagged"].sum()), "errors": int(df["has_error"].sum()),
            "reviewed": int(df["verdict"].notna().sum()),
            "reviewed_flagged": int((df["verdict"].notna() & df["flagged"]).sum()),
        }  # fmt: skip

    def select(self, q: Query) -> np.ndarray:
        """Row ids matching ``q``, in its order (ties by path, so paging is stable)."""
        df = self.df
        m = np.ones(len(df), dtype=bool)
        if q.q:
            m &= df["path"].str.contains(q.q, case=False, regex=False).to_numpy()
        for col in ("label", "view", "source", "kind"):
            want = getattr(q, col)
            if want:
                vals = df[col].astype(object)
                m &= (vals.isna() if want == "(none)" else vals.astype(str) == want).to_numpy()
        if q.scope == "in":
            m &= (df["in_scope"] == True).to_numpy()  # noqa: E712 (nullable column)
        elif q.scope == "out":
            m &= (df["in_scope"] == False).to_numpy()  # noqa: E712
        if q.errors == "only":
            m &= df["has_error"].to_numpy()
        elif q.errors == "none":
            m &= ~df["has_error"].to_numpy()
        if q.flagged:
            m &= df["flagged"].to_numpy()
        if q.verdict == "reviewed":
            m &= df["verdict"].notna().to_numpy()
        elif q.verdict == "unreviewed":
            m &= df["verdict"].isna().to_numpy()
        elif q.verdict:
            m &= (df["verdict"] == q.verdict).to_numpy()
        col = "name_key" if q.sort == "name" else q.sort
        sub = df.loc[m, ["id", col]]
        key = sub[col]
        if key.dtype == object:
            key = key.astype(str).where(key.notna(), None)
        order = sub.assign(_k=key).sort_values(
            ["_k", "id"], ascending=[not q.desc, True], na_position="last", kind="stable"
        )
        return order["id"].to_numpy()

    def table_rows(self, ids: np.ndarray) -> list[dict[str, Any]]:
        cols = [c for c in TABLE_COLUMNS if c in self.df.columns]
        sub = self.df.loc[ids, cols]
        return [{k: json_value(v) for k, v in r.items()} for r in sub.to_dict("records")]

    def row(self, rid: int) -> dict[str, Any]:
        if not 0 <= rid < len(self.df):
            raise KeyError(rid)
        r = self.df.loc[rid].to_dict()
        r.pop("has_error", None)
        return {k: json_value(v) for k, v in r.items()}

    def history(self, rid: int) -> list[dict[str, Any]]:
        path = self.df.at[rid, "path"]
        log = self.log.read()
        return log[log["path"] == path].to_dict("records")

    def record(self, rid: int, verdict: str, note: str, reviewer: str) -> dict[str, Any]:
        """Append a verdict for row ``rid`` to reviews.csv; returns the logged record. A row without a score
        (an error, a skipped series) takes no verdict: there is nothing to confirm or correct."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        reviewer, note = _clean(reviewer), _clean(note)
        if not reviewer:
            raise ValueError("a verdict needs a reviewer name")
        if len(reviewer) > MAX_REVIEWER or len(note) > MAX_NOTE:
            raise ValueError(f"a reviewer name is at most {MAX_REVIEWER} characters and a note {MAX_NOTE}")
        r = self.df.loc[rid]
        if r["has_error"] or _text(r["score"]) is None:
            raise ValueError(f"{r['path']} has no score ({_text(r['error']) or _text(r.get('reason')) or 'not scored'})")
        rec = {
            "reviewed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "reviewer": _safe_cell(reviewer),
            "path": r["path"],
            "verdict": verdict,
            "note": _safe_cell(note),
            "label": _text(r["label"]) or "",
            "score": f"{float(r['score']):.6f}",
            "bundle_id": _text(r.get("bundle_id")) or "",
        }
        with self._lock:
            self.log.append(rec)
            for c in ("verdict", "reviewer", "note", "reviewed_at"):
                self.df.at[rid, c] = rec[c]
        return rec
