"""mlstm.py against an independent step-by-step re-derivation of the equations, and gradcheck."""
import torch
from torch.func import functional_call

from mlstm import MLSTM, weight_norm


def reference_forward(model, x, h, c):
    """The equations of Radford et al. / Krause et al. written out per timestep, per column."""
    def wn(name):
        v = getattr(model, "w" + name).detach().double()
        if not model.use_wn:
            return v
        g = getattr(model, "g" + name).detach().double()
        w = torch.empty_like(v)
        for j in range(v.shape[1]):  # w_j = g_j * v_j / ||v_j|| for each output unit j
            w[:, j] = g[j] * v[:, j] / torch.sqrt((v[:, j] ** 2).sum())
        return w

    wx, wh, wmx, wmh = wn("x"), wn("h"), wn("mx"), wn("mh")
    b, emb = model.b.detach().double(), model.embed.weight.detach().double()
    wout, bout = model.out.weight.detach().double(), model.out.bias.detach().double()
    H = model.hidden
    logits, cells = [], []
    for t in range(x.shape[1]):
        e = emb[x[:, t]]
        m = (e @ wmx) * (h @ wmh)
        z = e @ wx + m @ wh + b
        i, f, o, u = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
        h = torch.sigmoid(o) * torch.tanh(c)
        logits.append(h @ wout.T + bout)
        cells.append(c)
    return torch.stack(logits, 1), torch.stack(cells, 1), h, c


def test_forward_matches_step_by_step_reference():
    for use_wn in (True, False):
        torch.manual_seed(0)
        model = MLSTM(hidden=24, embed=8, weight_norm=use_wn).double()
        with torch.no_grad():  # gains away from their initial norms, so weight norm really acts
            for n in ("gx", "gh", "gmx", "gmh") if use_wn else ():
                getattr(model, n).mul_(torch.rand_like(getattr(model, n)) + 0.5)
            model.b.normal_()
        x = torch.randint(0, 256, (3, 11))
        h0, c0 = torch.randn(3, 24, dtype=torch.float64), torch.randn(3, 24, dtype=torch.float64)
        logits, (h, c), cells = model(x, (h0, c0), return_cells=True)
        ref_logits, ref_cells, ref_h, ref_c = reference_forward(model, x, h0, c0)
        for name, a, r in (("logits", logits, ref_logits), ("cells", cells, ref_cells), ("h", h, ref_h), ("c", c, ref_c)):
            err = (a - r).abs().max().item()
            assert err < 1e-10, f"{name} (weight_norm={use_wn}): max |diff| {err}"


def test_state_carried_across_windows_equals_one_long_window():
    torch.manual_seed(1)
    model = MLSTM(hidden=16, embed=8)
    x = torch.randint(0, 256, (2, 20))
    full, _ = model(x)
    a, state = model(x[:, :7])
    b, _ = model(x[:, 7:], state)
    err = (torch.cat([a, b], 1) - full).abs().max().item()
    assert err < 1e-6, f"max |diff| {err}"


def test_weight_norm_formula_and_initial_gain():
    torch.manual_seed(2)
    v, g = torch.randn(5, 7, dtype=torch.float64), torch.rand(7, dtype=torch.float64)
    explicit = torch.stack([g[j] * v[:, j] / v[:, j].norm() for j in range(7)], 1)
    err = (weight_norm(v, g) - explicit).abs().max().item()
    assert err < 1e-12, f"max |diff| {err}"
    model = MLSTM(hidden=8, embed=4)
    for name, w in zip(("x", "h", "mx", "mh"), model.weights()):  # at init, w == v
        err = (w - getattr(model, "w" + name)).abs().max().item()
        assert err < 1e-6, f"w{name}: max |diff| {err}"
    assert not any(n.startswith("g") for n, _ in MLSTM(hidden=8, weight_norm=False).named_parameters())


def test_weight_norm_in_fp16_does_not_overflow():
    v = torch.full((4096, 3), 8.0, dtype=torch.float16)  # sum of squares 262144 > fp16 max 65504: the
    # norm must not be summed in fp16
    w = weight_norm(v, torch.ones(3, dtype=torch.float16))
    assert torch.isfinite(w).all(), "fp16 weight norm overflowed"
    err = (w.float() - 4096**-0.5).abs().max().item()
    assert err < 1e-3, f"max |diff| {err}"


def test_gradcheck_float64():
    torch.manual_seed(3)
    model = MLSTM(hidden=3, embed=4, vocab=5).double()
    names = [n for n, _ in model.named_parameters()]
    x = torch.randint(0, 5, (2, 3))
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def f(h, c, *ps):
        logits, (hT, cT) = functional_call(model, dict(zip(names, ps)), (x, (h, c)))
        return logits, hT, cT

    assert torch.autograd.gradcheck(f, (h0, c0) + params, eps=1e-6, atol=1e-6)
