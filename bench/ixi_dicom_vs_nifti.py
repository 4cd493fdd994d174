"""Every IXI volume in ../shared/data scored twice: as its NIfTI file and as a DICOM series written from it
(random file names, invented headers, RescaleSlope = the NIfTI's scl_slope), with the same bundle. Prints
the largest difference of each volume-level column over the 42 volumes (issue 15: +/- 1e-4).

    python bench/ixi_dicom_vs_nifti.py --bundle runs/x/bundle      # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

IXI = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi-t1-nichart-42" / "nifti"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--ixi", type=Path, default=IXI)
    args = p.parse_args()

    import nibabel as nib

    from raytumor.results import read_scores
    from raytumor.score import ScoreConfig, score
    from raytumor.synth_dicom import new_uid, write_series

    work = Path(tempfile.mkdtemp(prefix="ixi-dicom-"))
    rng = np.random.default_rng(0)
    (work / "nifti").mkdir()
    for f in sorted(args.ixi.glob("*.nii.gz")):
        img = nib.load(f)
        d = img.dataobj
        write_series(work / "dicom" / f.name.split("_")[0], d.get_unscaled(), img.affine, rng=rng,
                     study_uid=new_uid(rng), rescale=(d.slope, d.inter))  # fmt: skip
        shutil.copy(f, work / "nifti")
    for kind in ("dicom", "nifti"):
        score(ScoreConfig(bundle=args.bundle, input=str(work / kind), output=str(work / f"out_{kind}")))
    d, n = read_scores(str(work / "out_dicom")), read_scores(str(work / "out_nifti"))
    d["subject"] = d["path"].str.extract(r"dicom/([^#/]+)#")[0]
    n["subject"] = n["path"].str.extract(r"nifti/([^_/]+)_")[0]
    m = d.merge(n, on="subject", suffixes=("_dicom", "_nifti"))
    print(f"{len(m)} volumes both ways ({len(d)} series rows, {len(n)} NIfTI rows)")
    for c in ("score", "score_max", "score_mean", "prob_yes"):
        print(f"{c}: max |DICOM - NIfTI| = {float((m[c + '_dicom'] - m[c + '_nifti']).abs().max()):.2e}")
    same = (m["slice_dicom"] == m["slice_nifti"]) & (m["n_slices_dicom"] == m["n_slices_nifti"])
    print(f"same scored slices and score slice: {int(same.sum())} of {len(m)}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
