"""Logistic regression fitted by hand in float64, full batch: transfer.py's classifiers, tested against scikit-learn.

Objective, scikit-learn's convention divided by C: sum_i logloss_i + ||w||^2 / (2C)  (L2)  or  + ||w||_1 / C
(L1), the bias unpenalised. A means to transfer.py's end (runtime dependencies are torch and numpy only, and
the same code runs on a GPU); tests/test_transfer.py checks both against sklearn's LogisticRegression.
  - L2: Newton's method / IRLS, each step one weighted least-squares solve, exact optimum in a few steps;
  - L1 (the reference's choice): proximal Newton, each step's model solved by coordinate descent and
    feature-sign search (3x faster than the accelerated proximal gradient it replaces: BENCHMARKS.md).
"""
import warnings

import numpy as np
import torch
import torch.nn.functional as F


def _design(X, y, device):
    X = torch.as_tensor(np.asarray(X), dtype=torch.float64, device=device)
    Xb = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype, device=device)], 1)  # last column: the bias
    return Xb, torch.as_tensor(np.asarray(y), dtype=torch.float64, device=device)


def _init(init, D1, device):
    return torch.zeros(D1, dtype=torch.float64, device=device) if init is None else \
        torch.as_tensor(np.append(init[0], init[1]), dtype=torch.float64, device=device)


def _solve_pd(A, rhs):
    """A^-1 rhs for a symmetric A that is positive definite in exact arithmetic but perhaps not in floating point
    (more free features than rows, duplicated or all-zero columns, bag-of-words counts, separable classes,
    a Hessian summed in float32): a Cholesky, retried with damping mu I, mu growing tenfold from 1e-10 of the
    largest diagonal entry, until it factorises. Damping only shortens a Newton step towards a gradient step:
    the line search and the stopping test, both in float64, still lead to the optimum."""
    scale, mu = float(A.diagonal().abs().max()), 0.0
    for _ in range(25):
        L, info = torch.linalg.cholesky_ex(A if mu == 0 else A + mu * torch.eye(len(A), dtype=A.dtype, device=A.device))
        if int(info) == 0:
            return torch.cholesky_solve(rhs[:, None], L)[:, 0]
        mu = 1e-10 * max(scale, 1e-300) if mu == 0 else 10 * mu
    raise FloatingPointError(f"a Newton system of {len(A)} features stays singular after damping (max |H| {scale:g})")


def fit_l2(X, y, C, init=None, tol=1e-12, max_iter=100, device="cpu"):
    """min_{w,b} sum_i [log(1+e^z_i) - y_i z_i] + ||w||^2/(2C), z = Xw + b: sklearn's LogisticRegression(C)
    (C * sum loss + ||w||^2/2) divided by C, same optimum. Newton/IRLS with step halving. -> (w, b)."""
    Xb, y = _design(X, y, device)
    reg = torch.full((Xb.shape[1],), 1.0 / C, dtype=torch.float64, device=device)
    reg[-1] = 0.0  # bias unpenalised
    th = _init(init, Xb.shape[1], device)
    obj = lambda t: (F.softplus(Xb @ t) - y * (Xb @ t)).sum() + 0.5 * (reg * t * t).sum()  # noqa: E731
    f = obj(th)
    for _ in range(max_iter):
        p = torch.sigmoid(Xb @ th)
        g = Xb.T @ (p - y) + reg * th
        A = Xb * (p * (1 - p)).sqrt()[:, None]
        Hm = A.T @ A + torch.diag(reg + 1e-12)  # X^T W X + R: the weighted least-squares normal matrix
        step = _solve_pd(Hm, g)
        dec = float(g @ step)  # Newton decrement^2: twice the predicted decrease
        t = 1.0
        while (fn := obj(th - t * step)) > f - 0.25 * t * dec and t >= 1e-8:  # Armijo step halving:
            t /= 2                                                             # plain Newton can overshoot
        if t < 1e-8:  # no step lowers the objective beyond rounding: th is already the optimum
            break
        th, f = th - t * step, fn
        if dec < tol * (1.0 + abs(float(f))):
            break
    th = th.cpu().numpy()
    return th[:-1], float(th[-1])


def _violation(r, w, lam):
    """Each coordinate's distance from optimality for gradient r of the smooth part: a subgradient residual of
    r + lam.|w|, 0 at the optimum."""
    return torch.where(w != 0, (r + lam * torch.sign(w)).abs(), (r.abs() - lam).clamp(min=0))


def _coordinate_descent(H, g, th, lam, sweeps):
    """`sweeps` cyclic coordinate-descent passes over  g.(w - th) + (w - th).H.(w - th) / 2 + lam.|w|  from w = th
    (numpy scalars: a Python loop over coordinates). Cheap, and good at finding which weights are zero."""
    Hn, w = H.cpu().numpy(), th.cpu().numpy().copy()
    Hd = np.zeros_like(w)  # H (w - th)
    diag, g, lam = Hn.diagonal().tolist(), g.tolist(), lam.tolist()
    for _ in range(sweeps):
        for j in range(len(w)):
            wj = float(w[j])
            u, t = wj - (g[j] + float(Hd[j])) / diag[j], lam[j] / diag[j]
            new = u - t if u > t else u + t if u < -t else 0.0  # the coordinate's exact minimum: a soft threshold
            if new != wj:
                Hd += (new - wj) * Hn[j]
                w[j] = new
    return torch.as_tensor(w, device=th.device)


def _l1_newton_step(H, g, th, lam, tol, rounds=10, sweeps=15):
    """argmin_w  g.(w - th) + (w - th).H.(w - th) / 2 + lam.|w|  (the objective's quadratic model): a few
    coordinate-descent sweeps, then feature-sign search (Lee et al. 2007): fix the signs of the weights that are
    or would become nonzero, jump to the quadratic's minimum with those signs, and stop on the way at the best
    point before a sign flips; until no coordinate's violation reaches `tol`, or for at most `rounds` rounds: each
    costs a Cholesky of the working set, and on 3072 features an outer Newton step with its line search is cheaper
    than polishing the model (SST-2 concat path: 874 s with 200 rounds, 235 s with 10). Returns w - th."""
    w = _coordinate_descent(H, g, th, lam, sweeps)
    for _ in range(rounds):
        r = g + H @ (w - th)  # the quadratic's gradient at w
        if float(_violation(r, w, lam).max()) < tol:
            break
        s = torch.where(w != 0, torch.sign(w), torch.where(r > lam, -1.0, torch.where(r < -lam, 1.0, 0.0)))
        free = s != 0
        d = torch.zeros_like(w)
        d[free] = -_solve_pd(H[free][:, free], (r + lam * s)[free])
        # the model along w + t d is r.d t + d.H.d t^2 / 2 + lam.|w + t d|: try t = 1 and each t < 1 where a
        # weight reaches zero, keep the lowest
        cross = torch.where((w != 0) & (w * d < 0), -w / d, torch.full_like(w, 2.0))
        ts = torch.cat([cross[cross < 1], torch.ones(1, dtype=w.dtype, device=w.device)])  # [k]
        values = float(r @ d) * ts + 0.5 * float(d @ (H @ d)) * ts * ts + (lam * (w + ts[:, None] * d).abs()).sum(1)
        k = int(torch.argmin(values))
        w = w + ts[k] * d
        if k < len(ts) - 1:  # stopped where a weight reaches zero: make it exactly zero
            w[int(torch.argmin((cross - ts[k]).abs()))] = 0.0
    return w - th


def fit_l1(X, y, C, init=None, tol=1e-6, max_iter=300, device="cpu"):
    """min_{w,b} sum_i logloss_i + ||w||_1 / C: sklearn's L1 LogisticRegression(C) divided by C. Proximal Newton,
    as liblinear's newGLMNET: each step minimises the objective's quadratic model plus the L1 term over a working
    set (the nonzero weights, the bias, and the zeros whose gradient breaks optimality), then backtracks along it
    until the objective falls enough; stops when the optimality violation (a subgradient residual) is below
    tol * N, or warns after max_iter steps. -> (w, b) with exact zeros."""
    Xb, y = _design(X, y, device)
    N, D1 = Xb.shape
    lam = torch.full((D1,), 1.0 / C, dtype=torch.float64, device=device)
    lam[-1] = 0.0
    th = _init(init, D1, device)
    z = Xb @ th
    obj = lambda z, t: float((F.softplus(z) - y * z).sum() + (lam * t.abs()).sum())  # noqa: E731
    f = obj(z, th)
    for _ in range(max_iter):
        p = torch.sigmoid(z)
        g = Xb.T @ (p - y)
        viol = _violation(g, th, lam)
        if float(viol.max()) < tol * N:
            break
        S = (th != 0) | (viol > 0)
        S[-1] = True
        XS = Xb[:, S]
        # The smooth part's Hessian on the working set, summed in float32 (half the time of float64): it only
        # shapes the step; the gradient and the stopping test stay float64.
        XS32 = XS.float()
        H = (XS32.T @ (XS32 * (p * (1 - p)).float()[:, None])).double()
        # exactly collinear features stay solvable; and no zero on the diagonal, which coordinate descent divides
        # by, even where every entry is zero (all rows saturated)
        H.diagonal().add_(1e-9 * float(H.diagonal().mean()) or 1e-12)
        thS, idx = th[S], S.nonzero()[:, 0]
        # the model solved only as well as this step needs: coarsely far from the optimum, finely close to it
        d = _l1_newton_step(H, g[S], thS, lam[S], 0.1 * max(tol * N, 0.1 * float(viol.max())))
        decrease = float(g[S] @ d + (lam[S] * ((thS + d).abs() - thS.abs())).sum())  # predicted, < 0
        Xd, t = XS @ d, 1.0
        while (fn := obj(z + t * Xd, th.index_put((idx,), thS + t * d))) > f + 0.01 * t * decrease and t > 1e-10:
            t /= 2  # Armijo backtracking: a full Newton step can overshoot
        if t <= 1e-10:  # no step lowers the objective beyond rounding: th is the optimum
            break
        th, z, f = th.index_put((idx,), thS + t * d), z + t * Xd, fn
    else:  # the loop never met the stopping test
        warnings.warn(f"fit_l1 at C={C:g} stopped at max_iter={max_iter} before converging (tol={tol:g})")
    th = th.cpu().numpy()
    return th[:-1], float(th[-1])
