"""The scoring job: config, plan (what is left to score), the Ray Data pipeline, the summary, the CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from raytumor import volumes
from raytumor.bundle import BundleMeta, validate_bundle
from raytumor.config import from_args, opt, stage_parser
from raytumor.predict import NONFINITE_ERROR
from raytumor.results import (
    ADABN_FILE,
    EXPLAIN_DIR,
    RUN_FILE,
    SCORES_DIR,
    SUMMARY_COLUMNS,
    SUMMARY_FILE,
    read_scores,
    scored_ids,
    summarise,
    write_csv,
    write_slice_rows,
    write_studies,
)
from raytumor.runtime import init_ray, pool_size, predictor_resources
from raytumor.score.actors import ScorePredictor
from raytumor.score.adabn import adabn_state
from raytumor.score.decode import collect_unreachable, map_read_decode, new_unreachable_log
from raytumor.score.dicom_sr import REPORT_COLUMNS, write_reports
from raytumor.score.progress import ProgressReporter, RowCounter
from raytumor.score.series import HEADERS_FILE, SERIES_FILES, candidates, series_units
from raytumor.series import SeriesRules, new_salt
from raytumor.storage import StorageOptions, Units, get_filesystem, join, list_units, read_text, write_text


@dataclass
class ScoreConfig:
    bundle: str = opt(
        help="model bundle: a directory or s3://|gs:// URI (from raytumor train/tune)", required=True
    )
    input: str = opt(
        help="folder, s3://|gs:// prefix, .zip/.tar(.gz) archive, or manifest (.csv/.parquet with a path "
        "column, or .txt with one path per line)",
        required=True,
    )
    output: str = opt(help="output folder or s3://|gs:// prefix (Parquet parts + summary)", required=True)
    s3_endpoint: str | None = opt(None)
    batch_size: int | None = opt(None, "images per forward pass (default: 256 on GPU, 8 on CPU)")
    threshold: float | None = opt(None, "override the bundle's operating threshold")
    csv: bool = opt(False, "also write OUTPUT/scores.csv")
    slice_rows: bool = opt(False, "also write OUTPUT/slices.parquet: one row per volume slice")
    explain: bool = opt(False, "Grad-CAM overlays (PNG) of positive scans in OUTPUT/explain/")
    min_foreground: float = opt(0.05, "volumes: skip slices with less head than this share")
    # Volumes (see raytumor.volumes): score slices 10-110 mm below the vertex; a positive must hold on
    # 10 mm of contiguous slices. 0 disables each rule.
    volume_skip_top_mm: float = opt(
        volumes.DEFAULT_SKIP_TOP_MM, "volumes: do not score slices within this distance below the vertex"
    )
    volume_depth_mm: float = opt(
        volumes.DEFAULT_DEPTH_MM, "volumes: score slices down to this distance below the vertex (0: all)"
    )
    volume_min_extent_mm: float = opt(
        volumes.DEFAULT_MIN_EXTENT_MM,
        "volumes: the volume score must hold on this many mm of contiguous slices (0: the max slice)",
    )
    adapt: str = opt(
        "none",
        "test-time adaptation: adabn re-estimates BatchNorm statistics on this input first (a streaming "
        "pass over a sample; saved as OUTPUT/adabn_state.pt and reused on resume)",
        choices=("none", "adabn"),
    )
    adapt_samples: int = opt(4096, "images (slices) the AdaBN pass measures (0: all of them)")
    tta: str = opt(
        "none", "test-time augmentation: flip averages with the left-right mirror", choices=("none", "flip")
    )
    max_file_bytes: int = opt(2 << 30, "larger files/members become error rows")
    units_per_block: int = opt(32, "units per block: what an interrupted run can lose")
    num_actors: int | None = opt(None, "model actors (default: one per GPU, or sized from the CPUs)")
    overwrite: bool = opt(False, "clear OUTPUT first instead of resuming")
    series: str = opt(
        "auto",
        "DICOM files that form a series (same study and series UID, positions along one normal) are scored as "
        "one volume: one row per series; off: every DICOM file is its own row",
        choices=("auto", "off"),
    )
    series_rules: str | None = opt(
        None, "YAML overriding the series selection rules (modalities, skip_localizers, min_slices, "
        "include_derived, max_missing_fraction, orientation_tolerance)"
    )  # fmt: skip
    dicom_out: str | None = opt(
        None,
        "write a DICOM Structured Report (TID 1500) per scored series here, to send back to PACS (these files "
        "carry the source study's patient module; e.g. OUTPUT/dicom)",
    )
    uid_salt: str | None = opt(
        None, "key of the study/series UID hashes in the rows (default: a random one kept in OUTPUT/uid_salt)"
    )
    with_uids: bool = opt(
        False,
        "also write raw StudyInstanceUID/SeriesInstanceUID and SeriesDescription (inside your network only)",
    )
    score_out_of_scope: bool = opt(
        False,
        "give inputs outside the bundle's scope (a view or modality it never learned, out-of-distribution "
        "images) a class label anyway; by default their label is out_of_scope (probabilities kept)",
    )

    def __post_init__(self) -> None:
        if self.adapt not in ("none", "adabn") or self.tta not in ("none", "flip"):
            raise ValueError(f"adapt must be none|adabn and tta none|flip, got {self.adapt!r}, {self.tta!r}")
        if self.series not in ("auto", "off"):
            raise ValueError(f"series must be auto|off, got {self.series!r}")
        if self.series_rules:
            SeriesRules.from_yaml(self.series_rules)  # a bad rules file is a user error before any work

    @property
    def volume_range(self) -> tuple[float, float]:
        return (self.volume_skip_top_mm, self.volume_depth_mm)

    @property
    def adaptation(self) -> str:
        """What the ``adaptation`` column says: ``none``, ``adabn``, ``tta-flip`` or ``adabn+tta-flip``."""
        parts = (["adabn"] if self.adapt == "adabn" else []) + (["tta-flip"] if self.tta == "flip" else [])
        return "+".join(parts) or "none"

    def bundle_ref(self) -> str:
        # A bucket URI stays a URI: actors on other nodes fetch it themselves.
        return self.bundle if "://" in self.bundle else str(Path(self.bundle).resolve())


# ----------------------------------------------------------------------------------------------------------
# The output folder and what is left to score

# What a score run writes at the top of OUTPUT: anything else means the folder is not (only) a score output.
STUDIES_FILE = "studies.parquet"
SALT_FILE = "uid_salt"
OUTPUT_ENTRIES = {
    RUN_FILE, SUMMARY_FILE, SCORES_DIR, EXPLAIN_DIR, ADABN_FILE, "scores.csv", "slices.parquet", SALT_FILE,
    HEADERS_FILE, SERIES_FILES, STUDIES_FILE, "dicom",
}  # fmt: skip


class ScoreFailed(RuntimeError):
    """The job ran but its answers cannot be used (most rows non-finite): summary written, exit non-zero."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def check_output(cfg: ScoreConfig, storage: StorageOptions | None) -> bool:
    """Refuse an OUTPUT that exists and holds anything but a previous score run (a run.json): neither
    resuming into nor ``--overwrite`` clearing someone's folder. True when a previous run is there."""
    fs, root = get_filesystem(cfg.output, storage)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise ValueError(f"--output {cfg.output} is a file, not a folder")
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    names = sorted(e.base_name for e in entries)
    if not names or RUN_FILE in names:
        return bool(names)
    other = [n for n in names if n not in OUTPUT_ENTRIES] or names
    raise ValueError(
        f"--output {cfg.output} is not empty and holds no previous score run ({', '.join(other[:3])}"
        f"{', ...' if len(other) > 3 else ''}): use a new or empty folder"
    )


def start_output(cfg: ScoreConfig, meta: BundleMeta, storage: StorageOptions | None) -> dict[str, Any]:
    """Check that OUTPUT holds nothing but a previous run of the same job (or clear it with
    ``--overwrite``), then write its run.json. Returns the run record."""
    run = {
        "bundle": str(cfg.bundle),
        "bundle_id": meta.bundle_id,
        "input": cfg.input,
        "threshold": meta.threshold if cfg.threshold is None else cfg.threshold,
        "adaptation": cfg.adaptation,
        "volume_rule": [cfg.volume_skip_top_mm, cfg.volume_depth_mm, cfg.volume_min_extent_mm],
    }
    check_output(cfg, storage)
    previous = read_text(join(cfg.output, RUN_FILE), storage)
    if previous and not cfg.overwrite:
        prev = json.loads(previous)
        for k in ("bundle_id", "input", "threshold", "adaptation", "volume_rule"):
            if prev.get(k) != run[k]:
                raise ValueError(
                    f"{cfg.output} holds scores for {k}={prev.get(k)!r}, not {run[k]!r}: "
                    "use another --output, or --overwrite to start again"
                )
    if cfg.overwrite:
        fs, root = get_filesystem(cfg.output, storage)
        if fs.get_file_info(root).type == pafs.FileType.Directory:
            fs.delete_dir_contents(root)
    config = {**asdict(cfg), "uid_salt": "(given)" if cfg.uid_salt else None}  # a key is not for logs
    write_text(join(cfg.output, RUN_FILE), json.dumps({**run, "config": config}, indent=2) + "\n", storage)
    return run


def uid_salt(cfg: ScoreConfig, storage: StorageOptions | None) -> str:
    """The key of this output's UID hashes: ``--uid-salt``, else a random one kept in OUTPUT/uid_salt so a
    rerun hashes the same series to the same rows. A given salt is not stored, only its fingerprint: a
    rerun with another salt would name every series anew, and is refused."""
    path = join(cfg.output, SALT_FILE)
    kept = (read_text(path, storage) or "").strip()
    if cfg.uid_salt:
        mark = "sha256:" + hashlib.sha256(cfg.uid_salt.encode()).hexdigest()[:16]
        if kept and kept != mark:
            raise ValueError(
                f"{cfg.output} was scored with another UID salt: use the same --uid-salt, another --output, "
                "or --overwrite"
            )
        if not kept:
            write_text(path, mark + "\n", storage)
        return cfg.uid_salt
    if kept.startswith("sha256:"):
        raise ValueError(f"{cfg.output} was scored with a --uid-salt of your own: give it again")
    if not kept:
        kept = new_salt()
        write_text(path, kept + "\n", storage)
    return kept


@dataclass
class Plan:
    units: Units
    done: set[str]
    todo: pd.DataFrame  # unit rows to read (tars always: their members are known only once read)
    listing_errors: list[tuple[str, str]]  # (id, reason) decided while listing, not yet written
    removed_parts: int

    def frame(self) -> pd.DataFrame:
        """Unit rows for the pipeline; listing errors ride along as ``kind == "error"`` rows."""
        err_rows = pd.DataFrame(
            [
                {"id": i, "source": i, "member": None, "member_n": 1, "kind": "error", "size": 0}
                for i, _ in self.listing_errors
            ],
            columns=self.todo.columns,
        )
        if not self.listing_errors:
            return self.todo.reset_index(drop=True)
        return pd.concat([self.todo, err_rows], ignore_index=True)

    @property
    def n_todo(self) -> int:
        return len(self.todo) + len(self.listing_errors)


def plan(cfg: ScoreConfig, storage: StorageOptions | None, units: Units | None = None) -> Plan:
    units = list_units(cfg.input, storage) if units is None else units
    done, removed = scored_ids(cfg.output, storage)
    todo = units.table[~units.table["id"].isin(done) | (units.table["kind"] == "tar")]
    listing_errors = [(i, r) for i, r in units.error_rows if i not in done]
    return Plan(units, done, todo, listing_errors, removed)


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def run_pipeline(
    cfg: ScoreConfig, p: Plan, meta: BundleMeta, storage: StorageOptions | None, r: dict[str, Any],
    bn_state: dict | None, batch_size: int,
) -> list[str]:  # fmt: skip
    """list -> read/decode (CPU tasks) -> ScorePredictor actors, each writing its Parquet parts into
    OUTPUT/scores.
    Returns the units (ids; a tar archive's own) storage did not answer for: they have no row."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    gpu = r["num_gpus"] > 0
    explain_dir = join(cfg.output, EXPLAIN_DIR) if cfg.explain else None
    if explain_dir and "://" not in explain_dir:
        os.makedirs(explain_dir, exist_ok=True)
    sfs, spath = get_filesystem(join(cfg.output, SCORES_DIR), storage)
    sfs.create_dir(spath, recursive=True)
    if not p.n_todo:
        return []
    unreachable_log = new_unreachable_log()
    done_ref = ray.put(p.done) if p.done and (p.todo["kind"] == "tar").any() else None
    frame = p.frame()
    n_blocks = max(1, -(-len(frame) // cfg.units_per_block))
    actors = pool_size(cfg.num_actors or r["size"], n_blocks)
    ds = ray.data.from_pandas(frame).repartition(n_blocks)
    ds = map_read_decode(
        ds, cfg, meta, storage, r, cfg.volume_range, cfg.units_per_block, done_ids=done_ref,
        errors=dict(p.listing_errors), unreachable_log=unreachable_log,
    )  # fmt: skip
    ds = ds.map_batches(
        ScorePredictor,
        fn_constructor_kwargs={
            "bundle_dir": cfg.bundle_ref(),
            "batch_size": batch_size,
            "threshold": cfg.threshold,
            "num_threads": r["threads"],
            "explain_dir": explain_dir,
            "storage": storage,
            "slice_rows": cfg.slice_rows,
            "min_extent_mm": cfg.volume_min_extent_mm,
            "tta": cfg.tta,
            "bn_state": bn_state,
            "adaptation": cfg.adaptation,
            "score_out_of_scope": cfg.score_out_of_scope,
            "scores_dir": join(cfg.output, SCORES_DIR),
            "with_uids": cfg.with_uids,
        },
        compute=ActorPoolStrategy(size=actors),
        # A GPU wants whole forward batches; blocks stay small (resume granularity) and get bundled.
        batch_size=max(cfg.units_per_block, batch_size if gpu else 0),
        num_cpus=r["num_cpus"],
        num_gpus=r["num_gpus"],
        memory=r["memory"],
        batch_format="numpy",
        **r.get("remote_args", {}),
    )
    counter = RowCounter()
    reporter = ProgressReporter(counter, total=len(frame))
    print(
        f"[score] scoring {len(frame):,} units on {actors} model actor(s) ({'GPU' if gpu else 'CPU'}), "
        f"batch {batch_size}; progress every {reporter.period_s:g} s",
        flush=True,
    )
    with reporter:
        # The actors write the parts; what streams back is each part's row count.
        for counts in ds.iter_batches(batch_size=None, batch_format="numpy"):
            counter.add(int(counts["rows"].sum()))
    return collect_unreachable(unreachable_log)


def finish(
    cfg: ScoreConfig, p: Plan, meta: BundleMeta, storage: StorageOptions | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """Count every row of OUTPUT (this run's and earlier ones'), check rows in == rows out, write the
    summary (and scores.csv / slices.parquet on request)."""
    rows = read_scores(cfg.output, storage, columns=SUMMARY_COLUMNS)
    summary = summarise(rows, meta.negative_class)
    # Every listed file/zip member has a row (tar members are known only once read).
    units = p.units
    listed = set(units.table.loc[units.table["kind"] != "tar", "id"]) | {i for i, _ in units.error_rows}
    summary.update(
        {
            "input": cfg.input,
            "output": cfg.output,
            "bundle_id": meta.bundle_id,
            "threshold": meta.threshold if cfg.threshold is None else cfg.threshold,
            "units_listed": len(units.table) + len(units.error_rows),
            "duplicate_manifest_entries": units.duplicate_entries,
            "missing_rows": len(listed - set(rows["path"])),
            # No row, no error: storage did not answer (after retries); the same command reads them again.
            "unreachable": len(set(extra.pop("unreachable_ids", ())) | set(units.unreachable)),
            "duplicate_rows": summary["rows"] - summary["unique_paths"],
            "nonfinite_rows": int(rows["error"].eq(NONFINITE_ERROR).sum()),
            "this_run_units": p.n_todo,
            "resumed_from": len(p.done),
            "adaptation": cfg.adaptation,
            "dicom_out": cfg.dicom_out,
            **extra,
        }
    )
    summary.update(series_accounting(cfg, storage, rows))
    studies = write_studies(cfg.output, storage, meta.negative_class)
    if studies:
        summary["studies"] = studies
    if cfg.csv:
        summary["csv"] = write_csv(cfg.output, storage)
    if cfg.slice_rows:
        summary["slices"] = write_slice_rows(cfg.output, storage)
    write_text(join(cfg.output, SUMMARY_FILE), json.dumps(summary, indent=2, default=str) + "\n", storage)
    return summary


def series_accounting(cfg: ScoreConfig, storage: StorageOptions | None, rows: pd.DataFrame) -> dict[str, Any]:
    """Every DICOM file of a series is in exactly one series row's ``n_files`` or has its own row: checked
    against OUTPUT/series_files.parquet (file -> series row). Empty without series."""
    import pyarrow.parquet as pq

    fs, path = get_filesystem(join(cfg.output, SERIES_FILES), storage)
    try:
        with fs.open_input_file(path) as f:
            members = pq.read_table(f).to_pandas()
    except (FileNotFoundError, OSError):
        return {}
    series = rows[rows["kind"].eq("series")] if "kind" in rows.columns else rows.iloc[:0]
    n_files = dict(zip(series["path"], series["n_files"].fillna(0).astype(int), strict=True))
    per_series = members.groupby("series_path").size()
    return {
        "files_in_series": len(members),
        # a file in two series, or in a series and with its own row: counted twice
        "files_counted_twice": int(
            members["file"].duplicated().sum() + members["file"].isin(set(rows["path"])).sum()
        ),
        # a series row whose n_files disagrees with its files (or a series without a row yet)
        "series_files_mismatch": int(sum(n_files.get(s, -1) != n for s, n in per_series.items())),
    }


def nonfinite_failure(summary: dict[str, Any]) -> str | None:
    """Why the job failed, when more than half of the rows the model answered (scored rows plus NaN/inf
    rows, over all of OUTPUT) are non-finite: a broken bundle, whose few finite rows are not to be trusted
    either. A minority stays what it is: error rows, counted in the summary."""
    bad = summary.get("nonfinite_rows", 0)
    answered = summary["scored"] + bad
    if bad and 2 * bad > answered:
        return (
            f"{bad} of {answered} rows the model answered are non-finite (NaN/inf): the bundle's weights "
            f"or temperature are broken (rows written as errors to {summary['output']})"
        )
    return None


def score(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every unit at ``cfg.input`` into ``cfg.output``; returns the run summary. Raises
    :class:`ScoreFailed` (summary written) when most rows are non-finite."""
    t0 = time.time()
    storage = StorageOptions.from_env(cfg.s3_endpoint)
    # Everything the user gave is checked before anything is created or Ray starts: the bundle (probe
    # forward included), the output folder, the input (listing it); run.json is written only then.
    meta = validate_bundle(cfg.bundle, storage)
    check_output(cfg, storage)
    units = list_units(cfg.input, storage)
    start_output(cfg, meta, storage)
    n_listed = len(units.table)
    series_stats: dict[str, Any] = {}
    if cfg.series != "off" and candidates(units.table).any():
        units, _, series_stats = series_units(units, cfg, storage, uid_salt(cfg, storage))
        if series_stats.get("series"):
            st = series_stats
            print(
                f"[score] {n_listed:,} files listed; DICOM headers of {st['header_files']:,} "
                f"({st['header_files_read']:,} read now) in {st['header_seconds'] - st['ray_start_seconds']:.1f} s "
                f"(+{st['ray_start_seconds']:.1f} s Ray start-up): {st['series']} series of "
                f"{st['files_in_series']:,} files, {st['series_skipped']} of them skipped by the series rules, "
                f"{st['files_refused']} files could not join their series",
                flush=True,
            )
    p = plan(cfg, storage, units)
    t_list = time.time() - t0
    n_series = int((p.units.table["kind"] == "series").sum())
    print(
        f"[score] {len(p.units.table)} units listed ("
        + (f"{n_series} DICOM series, " if n_series else "")
        + f"{(p.units.table['kind'] == 'tar').sum()} tar archives streamed), {len(p.done)} already scored, "
        f"{len(p.todo)} to read"
        + (f", {p.removed_parts} partial parts from an interrupted run removed" if p.removed_parts else ""),
        flush=True,
    )
    bn_state, adapt_info = None, None
    if p.n_todo:  # nothing left to score (a finished run): no Ray at all
        init_ray()
    # sized from the cluster, so only once Ray is up (without it: no actors are needed)
    r = predictor_resources() if p.n_todo else {"num_gpus": 0, "size": 0}
    gpu = r["num_gpus"] > 0
    if cfg.adapt == "adabn" and p.n_todo:
        bn_state, adapt_info = adabn_state(cfg, p.units, meta, storage, r)
    # CPU: small batches stay in cache; measured on 2 cores, 1-thread replica, images/s at 8/16/32/64:
    # ResNet-18 224 px 56/51/49/45, EfficientNet-Lite0 160 px 162/114/140/- (bench/score_throughput.py).
    batch_size = cfg.batch_size or (256 if gpu else 8)
    unreachable_ids = run_pipeline(cfg, p, meta, storage, r, bn_state, batch_size)
    wall = time.time() - t0
    extra = {
        "seconds": round(wall, 2),
        "listing_seconds": round(t_list, 2),
        "units_per_s": round(p.n_todo / wall, 2) if wall > 0 else None,
        "device": "gpu" if gpu else "cpu",
        "batch_size": batch_size,
        "actors": cfg.num_actors or r["size"],
        **({"adabn": adapt_info} if adapt_info else {}),
        "unreachable_ids": unreachable_ids,
        **({"dicom_series": series_stats} if series_stats else {}),
    }
    if cfg.dicom_out:
        rows = read_scores(cfg.output, storage, columns=REPORT_COLUMNS)
        extra.update(
            write_reports(
                rows, p.units.table[p.units.table["kind"] == "series"], cfg.dicom_out, storage, cfg.max_file_bytes,
                {"backbone": meta.backbone, "negative_class": meta.negative_class,
                 "version": f"raytumor {meta.versions.get('raytumor', '?')}"},
                r.get("decode_cpus", 1.0),
            )
        )  # fmt: skip
    summary = finish(cfg, p, meta, storage, extra)
    failed = nonfinite_failure(summary)
    if failed:
        raise ScoreFailed(failed, summary)
    return summary


# ----------------------------------------------------------------------------------------------------------
# CLI


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return stage_parser(
        ScoreConfig,
        "Batch-score a folder, bucket, manifest or .zip/.tar archive of scans with a model bundle "
        "(one row per file/member/volume, resumable)",
        add_help,
    )


# Exit status when inputs were left unscored because storage was unreachable (sysexits EX_TEMPFAIL).
EXIT_RETRY = 75


# Exit status of a run stopped by Ctrl-C (the shell's 128 + SIGINT), as raytumor tune exits.
EXIT_INTERRUPTED = 130


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = from_args(ScoreConfig, args)
    try:
        s = score(cfg)  # starts Ray itself, once the bundle, input and output are checked
    except ScoreFailed as e:
        print_summary(e.summary)
        raise SystemExit(f"[score] FAILED: {e}") from None
    except KeyboardInterrupt:
        # Every part on storage is whole (a half-written one is removed on resume): say so, no traceback.
        try:  # count only: a part an actor is still writing is the next run's to remove
            storage = StorageOptions.from_env(cfg.s3_endpoint)
            kept = f"{len(read_scores(cfg.output, storage, ['path'], skip_unreadable=True)):,} rows are"
        except Exception:  # noqa: BLE001 - the count is a courtesy; the hint below is what matters
            kept = "the rows written so far are"
        print(
            f"[score] interrupted: {kept} in {join(cfg.output, SCORES_DIR)}; run the same command again "
            "to score the rest",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_INTERRUPTED) from None
    print_summary(s)
    if s.get("dicom_report_errors"):
        for e in s["dicom_report_errors"][:5]:
            print(f"[score] DICOM report not written: {e}", file=sys.stderr)
        raise SystemExit(
            f"[score] {len(s['dicom_report_errors'])} DICOM reports could not be written to {cfg.dicom_out}"
        )
    if s["unreachable"] or s["missing_rows"]:
        # Exit non-zero (EX_TEMPFAIL) so a scheduler retries: these inputs have no row yet, not an error row.
        why = (
            f"{s['unreachable']} inputs could not be read because storage was unreachable"
            if s["unreachable"]
            else f"{s['missing_rows']} listed inputs have no row"
        )
        print(f"[score] {why}; run the same command again to finish them", file=sys.stderr)
        raise SystemExit(EXIT_RETRY)
    return s


def print_summary(s: dict[str, Any]) -> None:
    print(
        f"[score] {s['rows']} rows: {s['scored']} scored, {s['errors']} errors, {s['positives']} positive, "
        f"{s['out_of_scope']} out of scope ({s['volumes']} volumes"
        + (f", {s['series_rows']} DICOM series" if s.get("series_rows") else "")
        + f"); this run {s['this_run_units']} units in {s['seconds']} s "
        f"({s['units_per_s']} units/s, {s['device']}, batch {s['batch_size']})"
    )
    if s["out_of_scope_reasons"]:
        print(
            "[score] out of scope (label out_of_scope; --score-out-of-scope labels them anyway): "
            + ", ".join(f"{k} {v}" for k, v in s["out_of_scope_reasons"].items())
        )
    if s.get("out_of_scope_labelled"):
        print(
            f"[score] {s['out_of_scope_labelled']} rows outside the bundle's scope were labelled anyway "
            "(--score-out-of-scope; in_scope false): "
            + ", ".join(f"{k} {v}" for k, v in s["out_of_scope_labelled_reasons"].items())
        )
    if s.get("series_rows"):
        print(
            f"[score] DICOM series: {s['series_rows']} rows ({s['files_in_series_rows']:,} files): "
            f"{s['series_scored']} scored, {s['skipped']} skipped"
            + (": " + ", ".join(f"{k.removeprefix('skipped: ')} {v}" for k, v in s["skipped_reasons"].items())
               if s["skipped_reasons"] else "")
            + ("; every file in one series row or its own row" if not s.get("files_counted_twice")
               and not s.get("series_files_mismatch") else
               f"; WARNING: {s.get('files_counted_twice')} files counted twice, "
               f"{s.get('series_files_mismatch')} series rows whose files disagree")
        )  # fmt: skip
    if s.get("studies"):
        print(f"[score] studies: {s['studies']} (one row per study: its highest in-scope series)")
    if s.get("dicom_reports"):
        print(f"[score] DICOM reports: {s['dicom_reports']} in {s['dicom_out']}")
    if s["error_reasons"]:
        print("[score] errors by reason: " + ", ".join(f"{k} {v}" for k, v in s["error_reasons"].items()))
    if s["missing_rows"] or s["duplicate_rows"]:
        print(
            f"[score] WARNING: {s['missing_rows']} listed files without a row, {s['duplicate_rows']} duplicate rows"
        )
    written = [join(s["output"], SCORES_DIR), join(s["output"], SUMMARY_FILE)] + [
        s[k] for k in ("csv", "slices") if s.get(k)
    ]
    print("[score] written: " + "  ".join(written))
