"""fast/logistic.py against scikit-learn on many generated problems, the hard ones included: more features than
rows, duplicated and all-zero columns, a feature equal to the label, separable classes, sparse word counts,
one to three rows of a class. For every C of transfer.py's sweep (warm-started along it, as transfer fits):
no exception, the objective within 1e-4 (relative) of sklearn's, the optimality conditions met, and for L1
the same sign pattern as sklearn's where the optimum is unique.

sklearn's liblinear penalises the bias as a feature (times intercept_scaling); ours does not. The reference
objective is therefore liblinear's w with the bias refitted unpenalised (a 1-D Newton here), which can only
lower it; for L2, lbfgs leaves the bias unpenalised as ours does."""
import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from fast.logistic import fit_l1, fit_l2
from transfer import GRID


def standardize(X):
    sd = X.std(0)
    return (X - X.mean(0)) / np.where(sd > 1e-12, sd, 1.0)


def labels(rng, X, noise=0.5, density=0.3):
    w = rng.normal(size=X.shape[1]) * (rng.random(X.shape[1]) < density)
    return (X @ w + noise * rng.normal(size=len(X)) > 0).astype(np.int64)


def generated(seed):
    """(name, X, y, unique): `unique` where the L1 optimum is unique (no duplicated columns)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(80, 10))
    yield "dense", X, labels(rng, X), True
    X = rng.normal(size=(30, 90))
    yield "more features than rows", X, labels(rng, X), True
    X = rng.normal(size=(60, 8))
    yield "duplicated and all-zero columns", standardize(np.hstack([X, X[:, :3], np.zeros((60, 2))])), \
        labels(rng, X), False
    X = rng.normal(size=(50, 6))
    y = labels(rng, X)
    yield "a feature equal to the label", standardize(np.hstack([X, y[:, None]])), y, True
    X = rng.normal(size=(40, 5))
    yield "separable", X, labels(rng, X, noise=0.0, density=1.0), True
    X = rng.poisson(0.05, size=(120, 300)).astype(np.float64)  # bag of words: mostly zeros, repeated columns
    yield "word counts", standardize(X), labels(rng, X, noise=0.3), False
    for k in (1, 2, 3):
        X = rng.normal(size=(40, 6 if k > 1 else 50))
        y = np.zeros(40, np.int64)
        y[rng.choice(40, k, replace=False)] = 1
        yield f"{k} rows of a class", standardize(X), y, False  # the L1 path of so few rows: near-ties


def objective(X, y, w, b, C, penalty):
    z = X @ w + b
    return np.logaddexp(0, z).sum() - y @ z + (np.abs(w).sum() / C if penalty == "l1" else w @ w / (2 * C))


def refit_bias(X, y, w, b):
    """The bias minimising the log loss for fixed w (Newton in 1-D, halving any step that raises the loss)."""
    z0 = X @ w
    loss = lambda b: np.logaddexp(0, z0 + b).sum() - y @ (z0 + b)  # noqa: E731
    for _ in range(100):
        p = 1 / (1 + np.exp(-(z0 + b)))
        g, h = (p - y).sum(), max((p * (1 - p)).sum(), 1e-12)
        step = g / h
        while loss(b - step) > loss(b) and abs(step) > 1e-14:
            step /= 2
        b -= step
        if abs(step) < 1e-12:
            break
    return b


def sklearn_fit(X, y, C, penalty, tol):
    if penalty == "l1":  # a large intercept_scaling: liblinear's bias penalty |b| / (scaling C) is small
        m = LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", tol=tol, max_iter=100000,
                               intercept_scaling=1e4)
    else:
        m = LogisticRegression(C=C, tol=min(tol, 1e-12), max_iter=100000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # liblinear's convergence warnings: the objective is compared anyway
        m.fit(X, y)
    w = m.coef_[0]
    return w, refit_bias(X, y, w, m.intercept_[0]) if penalty == "l1" else m.intercept_[0]


def kkt_residual(X, y, w, b, C, penalty):
    """The largest violation of the optimality conditions, relative to the data term's scale (N)."""
    g = X.T @ (1 / (1 + np.exp(-(X @ w + b))) - y)
    gb = abs((1 / (1 + np.exp(-(X @ w + b))) - y).sum())
    if penalty == "l2":
        r = np.abs(g + w / C)
    else:
        r = np.where(w != 0, np.abs(g + np.sign(w) / C), np.maximum(np.abs(g) - 1 / C, 0))
    return max(r.max(), gb) / len(y)


@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("seed", range(5))
def test_solvers_reach_sklearns_optimum_on_hard_problems(seed, penalty):
    fit = fit_l1 if penalty == "l1" else fit_l2
    for name, X, y, unique in generated(seed):
        init = None
        for C in GRID:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a fit that stops short of the optimum warns: a failure here
                w, b = init = fit(X, y, C, init=init)
            # liblinear to 1e-10 where the signs are compared; on the word counts that takes it a minute, so 1e-6
            # where they are not (its objective is then an upper bound, and the optimality test does the rest)
            rw, rb = sklearn_fit(X, y, C, penalty, 1e-10 if unique else 1e-6)
            f, ref = objective(X, y, w, b, C, penalty), objective(X, y, rw, rb, C, penalty)
            where = f"{name} (seed {seed}), {penalty}, C={C:g}"
            assert f <= ref + 1e-4 * abs(ref), f"{where}: objective {f:.8g}, sklearn's {ref:.8g}: " \
                f"{(f - ref) / abs(ref):.2e} relative"
            if penalty == "l2":  # lbfgs's bias is unpenalised like ours: the two optima are the same point
                assert abs(f - ref) <= 1e-4 * abs(ref), f"{where}: objective {f:.8g}, sklearn's {ref:.8g}"
            kkt = kkt_residual(X, y, w, b, C, penalty)
            assert kkt < 1e-4, f"{where}: optimality violated by {kkt:.2e}"
            if penalty == "l1" and unique:
                big = np.abs(rw) > 1e-4  # liblinear's tiny weights: within its tolerance of zero
                mism = np.flatnonzero(big & (np.sign(w) != np.sign(rw)))
                assert len(mism) == 0, f"{where}: signs differ at {mism}: ours {w[mism]}, sklearn's {rw[mism]}"
                extra = np.flatnonzero((w != 0) & ~big & (np.abs(w) > 1e-4))
                assert len(extra) == 0, f"{where}: nonzero where sklearn's is zero: {extra} {w[extra]} {rw[extra]}"
