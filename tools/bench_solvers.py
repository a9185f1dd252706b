"""transfer.py's L1 path against scikit-learn's: time, the C chosen on validation, accuracies, the objective.

The whole C grid (transfer.GRID) on SST-2's standardised features of a checkpoint (transfer.py's cache) and on
its bag of words: ours (fast/logistic.py's proximal Newton, warm-started along the path) and scikit-learn's
liblinear (newGLMNET in C; no warm start, its bias penalised unless scaled up: intercept_scaling 1e4), each at
its tolerance. scikit-learn is a test dependency, not a runtime one: this tool needs it installed.

    python tools/bench_solvers.py --data-dir ../shared/data/sst2 --feature mean     # the released model
    python tools/bench_solvers.py --data-dir ../shared/data/sst2 --feature cell --checkpoint out/demo/ckpt.pt
"""
import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import numpy as np

import data
import transfer
from plumbing import cli, labeled
from plumbing.checkpoints import RELEASED, load_pretrained


def objective(Z, y, w, b, C):
    """sum_i logloss_i + ||w||_1 / C in float64: the L1 fit's objective."""
    z = np.asarray(Z, dtype=np.float64) @ w + b
    return float(np.logaddexp(0, z).sum() - (y * z).sum() + np.abs(w).sum() / C)


def path(name, fit, Z, y):
    """Fit along the grid with `fit(Z, y, C, init) -> (w, b)`: the C best on validation and the time of it all."""
    t0, best, init = time.time(), None, None
    for C in transfer.GRID:
        w, b = init = fit(Z["train"], y["train"], C, init)
        val = transfer.accuracy(Z["val"], y["val"], w, b)
        if best is None or val > best[0]:
            best = (val, C, w, b)
    val, C, w, b = best
    return dict(solver=name, seconds=time.time() - t0, C=C, nonzero=int((w != 0).sum()), val_acc=val,
                test_acc=transfer.accuracy(Z["test"], y["test"], w, b), objective=objective(Z["train"], y["train"], w, b, C))


def main(a):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    def liblinear(tol):
        def fit(Z, y, C, init):
            m = LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", tol=tol, intercept_scaling=1e4,
                                   max_iter=10000).fit(Z, y)
            return m.coef_[0], float(m.intercept_[0])
        return fit

    splits = labeled.load_sst2(a.data_dir)
    y = {s: splits[s][1] for s in transfer.SPLITS}
    model = load_pretrained(a.checkpoint)[0].eval()
    cache = a.cache_dir or os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)), "features")
    X = {s: transfer.cached_features(model, a.checkpoint, s, [data.normalize(t) for t in splits[s][0]], cache,
                                     a.feature)[0] for s in transfer.SPLITS}
    problems = {f"mLSTM {a.feature}": transfer.standardize(*(X[s] for s in transfer.SPLITS)),
                "bag of 2000 words": transfer.standardize(*transfer.bag_of_words(*(splits[s][0] for s in transfer.SPLITS)))}
    print("| features | solver | seconds | C | nonzero | val | test | objective at C |\n|---|---|---:|---:|---:|---:|---:|---:|")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for what, mats in problems.items():
            Z = dict(zip(transfer.SPLITS, mats))
            for r in (path("ours (tol 1e-6 N)", lambda Z_, y_, C, init: transfer.fit_l1(Z_, y_, C, init=init), Z, y),
                      path("liblinear tol 1e-4", liblinear(1e-4), Z, y), path("liblinear tol 1e-6", liblinear(1e-6), Z, y)):
                print(f"| {what} | {r['solver']} | {r['seconds']:.1f} | {r['C']:g} | {r['nonzero']} | {r['val_acc']:.4f} "
                      f"| {r['test_acc']:.4f} | {r['objective']:.4f} |", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="transfer.py's L1 path against scikit-learn's (see the docstring).")
    p.add_argument("--data-dir", required=True, help="the SST-2 folder (train/dev/test.csv)")
    p.add_argument("--checkpoint", default=os.path.relpath(RELEASED), help="train.py checkpoint or released model")
    p.add_argument("--feature", choices=tuple(transfer.FEATURES), default="mean", help="transfer.py's feature")
    p.add_argument("--cache-dir", help="transfer.py's feature cache (default: CHECKPOINT_DIR/features)")
    args = p.parse_args()
    cli.main_guard(lambda: main(args))
