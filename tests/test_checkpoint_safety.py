"""Checkpoints on a shared --storage-path must not execute code when a run resumes or exports (issue 14)."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from raytumor.train.loop import (
    CHECKPOINT_MODEL,
    CHECKPOINT_PROGRESS,
    CHECKPOINT_STATE,
    _restore,
    _setup,
    read_progress,
)
from raytumor.train.package import load_checkpoint_files

CFG = {
    "backbone": "efficientnet_lite0", "num_classes": 2, "weights": "none", "dropout": 0.2, "lr": 1e-3,
    "backbone_lr": 3e-4, "weight_decay": 1e-4, "batch_size": 4, "n_train": 16, "epochs": 2,
    "warmup_epochs": 0.0, "metric": "val_roc_auc",
}  # fmt: skip


class _Payload:
    """Unpickling this runs os.system: what a crafted train_state.pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint(tmp_path: Path, state_payload: object | None = None) -> Path:
    run = _setup(CFG, 0, 1, torch.device("cpu"))
    d = tmp_path / "ckpt"
    d.mkdir()
    torch.save(run["model"].state_dict(), d / CHECKPOINT_MODEL)
    body = {"optimizer": run["optimizer"].state_dict(), "scheduler": run["scheduler"].state_dict()}
    if state_payload is not None:
        body["state"] = state_payload
        with open(d / CHECKPOINT_STATE, "wb") as f:
            pickle.dump(body, f)
    else:
        torch.save(body, d / CHECKPOINT_STATE)
    progress = {**run["state"], "epoch": 3, "history": [{"epoch": 3, "val_roc_auc": 0.9}]}
    (d / CHECKPOINT_PROGRESS).write_text(json.dumps(progress))
    return d


def test_resume_and_export_round_trip(tmp_path: Path) -> None:
    import ray.train

    d = _checkpoint(tmp_path)
    run = _setup(CFG, 0, 1, torch.device("cpu"))
    _restore(run, ray.train.Checkpoint.from_directory(str(d)), torch.device("cpu"), rank=1)
    assert run["state"]["epoch"] == 4 and run["state"]["resumed_at"] == [4]
    assert run["state"]["best"] == -math.inf  # JSON keeps the infinities of a fresh run
    _, state = load_checkpoint_files(ray.train.Checkpoint.from_directory(str(d)))
    assert state["history"][0]["val_roc_auc"] == 0.9


def test_crafted_train_state_never_runs(tmp_path: Path) -> None:
    import ray.train

    marker = tmp_path / "pwned"
    d = _checkpoint(tmp_path, state_payload=_Payload(marker))
    run = _setup(CFG, 0, 1, torch.device("cpu"))
    with pytest.raises(pickle.UnpicklingError):
        _restore(run, ray.train.Checkpoint.from_directory(str(d)), torch.device("cpu"), rank=1)
    # exporting reads only the weights (weights_only) and the JSON progress
    _, state = load_checkpoint_files(ray.train.Checkpoint.from_directory(str(d)))
    assert state["epoch"] == 3
    assert not marker.exists()


def test_old_checkpoint_without_progress_says_what_to_do(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    (d / CHECKPOINT_PROGRESS).unlink()
    with pytest.raises(FileNotFoundError, match="new --name"):
        read_progress(d)
