"""Logistic regression fitted by hand in float64, full batch: transfer.py's classifiers, tested against scikit-learn.

Objective, scikit-learn's convention divided by C: sum_i logloss_i + ||w||^2 / (2C)  (L2)  or  + ||w||_1 / C
(L1), the bias unpenalised. A means to transfer.py's end (runtime dependencies are torch and numpy only, and
the same code runs on a GPU); tests/test_transfer.py checks both against sklearn's LogisticRegression.
  - L2: Newton's method / IRLS, each step one weighted least-squares solve, exact optimum in a few steps;
  - L1 (the reference's choice): FISTA (accelerated proximal gradient, step 1/Lipschitz, adaptive restart).
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
        step = torch.linalg.solve(Hm, g)
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


def fit_l1(X, y, C, init=None, tol=1e-6, max_iter=20000, device="cpu"):
    """min_{w,b} sum_i logloss_i + ||w||_1 / C: sklearn's L1 LogisticRegression(C) divided by C. FISTA with
    step 1/L, L = lambda_max(Xb^T Xb)/4, adaptive restart; stops when the optimality violation (a
    subgradient residual) is below tol * N, or warns after max_iter. -> (w, b) with exact zeros."""
    Xb, y = _design(X, y, device)
    N, D1 = Xb.shape
    lam = torch.full((D1,), 1.0 / C, dtype=torch.float64, device=device)
    lam[-1] = 0.0
    L = float(torch.linalg.eigvalsh(Xb.T @ Xb)[-1]) / 4 * 1.0001
    th = _init(init, D1, device)
    z, tk = th.clone(), 1.0
    grad = lambda t: Xb.T @ (torch.sigmoid(Xb @ t) - y)  # noqa: E731
    for it in range(max_iter):
        v = z - grad(z) / L
        new = torch.sign(v) * (v.abs() - lam / L).clamp(min=0)  # soft threshold (prox of the L1 term)
        if float(((z - new) * (new - th)).sum()) > 0:  # momentum points uphill: restart it
            tk = 1.0
        tn = (1 + (1 + 4 * tk * tk) ** 0.5) / 2
        z, th, tk = new + (tk - 1) / tn * (new - th), new, tn
        if it % 10 == 9:
            g = grad(th)
            viol = torch.where(th != 0, (g + lam * torch.sign(th)).abs(), (g.abs() - lam).clamp(min=0))
            if float(viol.max()) < tol * N:
                break
    else:  # the loop never met the stopping test
        warnings.warn(f"fit_l1 at C={C:g} stopped at max_iter={max_iter} before converging (tol={tol:g})")
    th = th.cpu().numpy()
    return th[:-1], float(th[-1])
