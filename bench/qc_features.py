"""QC features vs segmentation quality (issue 9, item 4): does typicality rank images by how well they are segmented?

For a trained Super1 job (e.g. the shipped sample's Lite0-UNet), one Forte fit per feature choice — `encoder`
(the model's pooled encoder features), `mask` (morphology of its predicted mask, `matseg.ood.mask_features`) and
`both` (two views) — fitted exactly as `matseg.ood.qc_protocol` does: the ID images (the job's dataset, train+val)
split by image group with `qc_split(groups, 0.5, seed)`, Forte fitted on the fit groups' crops only, k = `auto_k` of
the fit data, crops of `qc_tile` px from `qc_embed`, every image scored in single mode. The evaluation set has real
failures:

- the job's test split (images the model never saw), clean;
- the same images under every synthetic shift of `matseg.ood.SHIFTS` (blur, noise, contrast, defocus) at every
  level 1..4 (`synthetic_shift`, noise seed = --seed of the split); their truth is the clean image's mask;
- EBC2 (another material, other classes): its IoU under a Super1 model is undefined, so its images count as
  failures for the AUROC and are left out of the Spearman.

Per image: typicality = mean Forte score of its crops; IoU = foreground mIoU of the tiled prediction
(`matseg.report.image_scores`). Per feature choice and split seed: Spearman(typicality, IoU) over the images with
an IoU, AUROC of -typicality for finding failures (IoU < --fail or EBC2; also without EBC2), with 95 % bootstrap
intervals over images (--boot draws). A plain reference next to them: the model's own mean max-softmax confidence.

    OMP_NUM_THREADS=1 python bench/qc_features.py /tmp/demo/super1-sample/<job> --ebc2 profiles/ebc2.json \
        --out runs/qc_features             # writes qc_features.csv (summary) and qc_features_images.csv

Prints markdown table rows for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score

from matseg.data import load_dataset, sample_groups
from matseg.ood import SHIFT_LEVELS, SHIFTS, Forte, auto_k, qc_embed, qc_split, qc_tile, synthetic_shift
from matseg.profile import load_profile
from matseg.report import image_scores
from matseg.runs import TrainedJob

REPO = Path(__file__).resolve().parents[1]
FEATURES = {"encoder": [0], "mask": [1], "both": [0, 1]}  # views of qc_embed(..., "both"): [encoder, mask]


def boot_ci(fn, n: int, draws: int, seed: int) -> tuple[float, float]:
    "95 % percentile interval of fn(index array) over bootstrap resamples of n items (NaN draws skipped)."
    g = np.random.default_rng(seed)
    v = np.array([fn(g.integers(0, n, n)) for _ in range(draws)], float)
    v = v[np.isfinite(v)]
    return (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) if len(v) else (np.nan, np.nan)


def auroc(fail, score) -> float:
    "AUROC of `score` for finding `fail` (NaN when only one class is present)."
    fail = np.asarray(fail, bool)
    return float(roc_auc_score(fail, score)) if 0 < fail.sum() < len(fail) else np.nan


def rho(a, b) -> float:
    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else np.nan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", help="trained Super1 job folder (or its checkpoint)")
    ap.add_argument("--profile", default=None, help="the job's profile (default: its run folder's)")
    ap.add_argument("--ebc2", default=str(REPO / "profiles" / "ebc2.json"), help="profile holding the EBC2 dataset ('' to skip)")
    ap.add_argument("--ebc2-splits", default="train,val,test")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="qc_split / Forte / noise seeds")
    ap.add_argument("--detector", default="gmm")
    ap.add_argument("--fail", type=float, default=0.5, help="an image with foreground mIoU below this is a failure")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap draws over images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "runs" / "qc_features"), help="output prefix: PREFIX.csv and PREFIX_images.csv")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    log = lambda *m: print(f"[{time.time() - t0:6.0f}s]", *m, file=sys.stderr, flush=True)  # noqa: E731

    tj = TrainedJob.open(a.job, load_profile(a.profile) if a.profile else None, device="cpu")
    spec, K = tj.spec(), tj.n_classes
    ID = tj.load_split(["train", "val"])
    gi = np.unique(sample_groups(ID["names"], spec), return_inverse=True)[1].ravel()
    tile = qc_tile(tuple(ID["x"].shape[-2:]))
    te = tj.load_split("test")

    # the evaluation images: clean test, every shift x level of it (noise drawn per seed 0), EBC2
    rows, xs, truths = [], [], []
    for i, n in enumerate(te["names"]):
        rows.append(dict(image=n, set="test", kind="clean", level=0)); xs.append(te["x"][i].numpy()); truths.append(te["masks"][i])
    for kind in SHIFTS:
        for lv in range(1, SHIFT_LEVELS + 1):
            u = synthetic_shift(te["unit"], kind, lv, seed=0)
            for i, n in enumerate(te["names"]):
                rows.append(dict(image=n, set="test", kind=kind, level=lv))
                xs.append(tj.from_unit(u[i], f"{n} {kind}@{lv}").numpy()); truths.append(te["masks"][i])
    if a.ebc2:
        ep = load_profile(a.ebc2); es = ep.datasets[0]
        ds = load_dataset(es, ep.base_dir, splits=a.ebc2_splits.split(","))
        for n, u in zip(np.asarray(ds["sample"].values), np.asarray(ds["image"].values, np.float32)):
            rows.append(dict(image=str(n), set=es.name, kind="other material", level=0))
            xs.append(tj.from_unit(u, f"{es.name} {n}").numpy()); truths.append(None)
    log(f"{len(xs)} evaluation images ({sum(t is not None for t in truths)} with a Super1 truth), tile {tile}")

    # per-image segmentation quality and the plain reference (mean max-softmax probability)
    for r, x, t in zip(rows, xs, truths):
        p = tj.probs(torch.from_numpy(x))
        r["confidence"] = float(p.max(0).values.mean())
        r["miou"] = image_scores(p.argmax(0).numpy(), t, K)["miou"] if t is not None else np.nan
    log("predictions done")

    # features: one embedding pass ("both" = [encoder, mask] views), shared by every feature choice and seed
    vid, sid, _ = qc_embed(tj, list(ID["x"].numpy()), tile, "both")
    vev, sev, _ = qc_embed(tj, xs, tile, "both")
    log(f"embedded {len(sid)} ID crops, {len(sev)} evaluation crops; dims {[v.shape[1] for v in vid]}")

    df = pd.DataFrame(rows)
    has = df["miou"].notna().to_numpy()
    fail = (~has) | (df["miou"].fillna(0).to_numpy() < a.fail)
    summ = []
    for seed in a.seeds:
        fit_img, _ = qc_split(gi, 0.5, seed)
        fit_pt = fit_img[sid]
        k = auto_k(int(fit_pt.sum()), int(fit_img.sum()))
        scored = {}
        for feat, which in FEATURES.items():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=ConvergenceWarning)
                f = Forte(a.detector, k=k, seed=seed).fit([vid[w][fit_pt] for w in which], groups=gi[sid[fit_pt]])
                sc = np.asarray(f.score([vev[w] for w in which], "single"), float)
            scored[feat] = np.array([sc[sev == i].mean() for i in range(len(df))])
        scored["confidence (reference)"] = df["confidence"].to_numpy()
        for feat, typ in scored.items():
            if seed == a.seeds[0] and feat in FEATURES: df[f"typicality_{feat}"] = typ
            iou = df["miou"].to_numpy()
            s1 = np.nonzero(has)[0]
            res = dict(seed=seed, features=feat, k=k, n_fit_images=int(fit_img.sum()), n_images=len(df),
                       n_iou=int(has.sum()), n_fail=int(fail.sum()), n_fail_iou=int((fail & has).sum()),
                       spearman=rho(typ[has], iou[has]), auroc_fail=auroc(fail, -typ),
                       auroc_fail_no_ebc2=auroc(fail[has], -typ[has]))
            if seed == a.seeds[0]:
                res["spearman_lo"], res["spearman_hi"] = boot_ci(lambda b: rho(typ[s1][b], iou[s1][b]), len(s1), a.boot, 0)
                res["auroc_fail_lo"], res["auroc_fail_hi"] = boot_ci(lambda b: auroc(fail[b], -typ[b]), len(df), a.boot, 0)
                res["auroc_no_ebc2_lo"], res["auroc_no_ebc2_hi"] = boot_ci(
                    lambda b: auroc(fail[s1][b], -typ[s1][b]), len(s1), a.boot, 0)
            summ.append(res)
        log(f"seed {seed}: k={k}, " + ", ".join(f"{r['features']} rho {r['spearman']:.3f} AUROC {r['auroc_fail']:.3f}"
                                                 for r in summ[-len(scored):]))
    S = pd.DataFrame(summ)
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    S.to_csv(f"{out}.csv", index=False); df.to_csv(f"{out}_images.csv", index=False)
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if ln.startswith("Model name")), platform.processor())
    print(f"\n{tj.meta.get('encoder')}-{tj.meta.get('decoder')} job {Path(a.job).name}; {cpu}, {a.threads} thread(s); "
          f"{len(df)} images ({int(has.sum())} with IoU, {int(fail.sum())} failures: {int((fail & has).sum())} IoU < {a.fail} "
          f"+ {int((~has).sum())} EBC2); seeds {a.seeds}; {time.time() - t0:.0f} s\n")
    print("| features | Spearman(typicality, IoU) seed 0 [95% CI] | over seeds (mean, min..max) | AUROC fail, with EBC2 [CI] "
          "| AUROC fail, Super1 only [CI] | over seeds |")
    print("|---|---|---|---|---|---|")
    for feat in scored:
        g = S[S.features == feat]; r0 = g.iloc[0]
        print(f"| {feat} | {r0.spearman:.3f} [{r0.spearman_lo:.3f}, {r0.spearman_hi:.3f}] | {g.spearman.mean():.3f} "
              f"({g.spearman.min():.3f}..{g.spearman.max():.3f}) | {r0.auroc_fail:.3f} [{r0.auroc_fail_lo:.3f}, "
              f"{r0.auroc_fail_hi:.3f}] | {r0.auroc_fail_no_ebc2:.3f} [{r0.auroc_no_ebc2_lo:.3f}, {r0.auroc_no_ebc2_hi:.3f}] | "
              f"{g.auroc_fail.mean():.3f} / {g.auroc_fail_no_ebc2.mean():.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
