"""What the report says about the bundle itself: intended use, known limits, the hyperparameters it was
trained with and where its operating threshold came from. Each fact has one source in ``bundle.json``."""

from __future__ import annotations

from typing import Any

from raytumor.bundle import BundleMeta

RESEARCH_BANNER = "Research use only \u2014 not a medical device. Not for diagnosis or treatment decisions."
KNOWN_LIMITS = [
    "Source confounds: public tumour and no-tumour images often come from different scanners, hospitals "
    "or preprocessing pipelines; a model can learn the scanner, hospital or export format instead of the "
    "tumour, and then fail on data from a new site.",
    "Slice-level 2-D images, not volumes: one slice per case, chosen by whoever assembled the set; a "
    "clinical study is a 3-D series, and a slice without tumour can come from a patient with one.",
    "Duplicates in public sets: the same slice appears several times (exact copies, resized or re-exported "
    "versions), inflating apparent performance when copies land in both training and test data. Files "
    "matching the bundle's training/validation fingerprints are excluded unless --keep-duplicates is given.",
    "Small evaluation sets give wide confidence intervals; the 95% bootstrap intervals on this page "
    "resample patients where the data names them (patient_id) and scans otherwise, treating those as "
    "independent, which near-duplicates that escaped detection make optimistic.",
    "Anatomy coverage: healthy slices at levels the training negatives never showed (skull base, posterior "
    "fossa) are often called tumour. Adding a few healthy scans of the site at every level to training "
    "(raytumor slices) is what removed this on another hospital's data; appearance fixes did not.",
    "Labels are folder names from the data source, not verified against pathology.",
]
INTENDED_USE = (
    "Research on machine-learning methods for brain-MRI tumour classification (slice level). Not a "
    "diagnostic device: not cleared or approved by any regulator, not validated prospectively, and not to "
    "be used for diagnosis, triage or treatment decisions."
)
# TrainConfig fields that shape the model, in the order the model card lists them (operational fields such
# as paths, worker counts or Ray resources are left out).
HYPERPARAMETERS = (
    "backbone",
    "weights",
    "image_size",
    "epochs",
    "batch_size",
    "lr",
    "backbone_lr",
    "weight_decay",
    "warmup_epochs",
    "freeze_epochs",
    "dropout",
    "label_smoothing",
    "augment_strength",
    "shift_augment",
    "preprocess",
    "metric",
    "patience",
    "target_sensitivity",
    "seed",
)
SUMMARY_KEYS = ("n", "roc_auc", "sensitivity", "specificity", "accuracy", "f1")


def hyperparameters(meta: BundleMeta) -> dict[str, Any]:
    """The hyperparameters the bundle's weights were trained with.

    ``train_config`` is the one source: for a Tune winner it is the winning trial's config. The search
    record (``metrics.search.config``: the values the winning trial sampled) is laid over it, so the
    values the weights were trained with win even where a bundle's train_config holds the search's base
    config, and the searched ones are named.
    """
    cfg = dict(meta.train_config or {})
    search = meta.metrics.get("search") or {}
    tuned = dict(search.get("config") or {})
    cfg.update(tuned)
    values = {k: cfg[k] for k in HYPERPARAMETERS if k in cfg}
    values.update({k: v for k, v in tuned.items() if k not in values})  # a searched field not listed above
    return {"values": values, "tuned": sorted(tuned), "search_trial": search.get("trial_id")}


def threshold_provenance(meta: BundleMeta) -> dict[str, Any]:
    """Whether the operating threshold was fitted on the validation split (a ``calibration`` record whose
    search found tumours there) or is the unfitted default, with the words the page uses for either."""
    cal = meta.metrics.get("calibration")
    if cal and not cal.get("reason"):
        target = cal.get("target_sensitivity")
        goal = f", for sensitivity \u2265 {target:g}" if target is not None else ""
        on = cal.get("fitted_on", "val")
        split = "validation" if on == "val" else str(on)
        return {
            "fitted": True,
            "label": f"{split}-fitted",
            "row": f"bundle ({split})",
            "source": f"{split} split at training time{goal}",
        }
    return unfitted_threshold(cal.get("reason") if cal else "the bundle records no calibration")


def unfitted_threshold(why: str) -> dict[str, Any]:
    return {
        "fitted": False,
        "label": "default, not fitted",
        "row": "bundle default (not fitted)",
        "source": f"default threshold, not fitted on any data ({why})",
    }


def _hyperparameter_entries(meta: BundleMeta) -> dict[str, Any]:
    hp = hyperparameters(meta)
    # ``train_config`` keeps its report.json name: the values, now every hyperparameter the run set.
    return {"train_config": hp["values"], "tuned_by_search": hp["tuned"], "search_trial": hp["search_trial"]}


def model_card(meta: BundleMeta, splits: dict[str, Any]) -> dict[str, Any]:
    return {
        "intended_use": INTENDED_USE,
        "known_limits": KNOWN_LIMITS,
        "training_data": splits,
        **_hyperparameter_entries(meta),
        "threshold": threshold_provenance(meta),
        "validation_metrics": meta.metrics.get("val"),
        "test_metrics": {k: v for k, v in (meta.metrics.get("test") or {}).items() if k in SUMMARY_KEYS},
        "versions": meta.versions,
    }
