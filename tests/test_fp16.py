"""fp16.py against independent references: float64 arithmetic, torch.amp.GradScaler, clip_grad_norm_,
numpy's float16 casts, fp32 training runs, and bit-for-bit comparisons of state before and after a skip."""
import copy
import re

import numpy as np
import pytest
import torch

import fp16
import train
from tools import grad_histogram
from fp16 import MixedPrecision
from mlstm import MLSTM, detach_state, loss_fn
from test_train import corpus, losses, run

INF = float("inf")


class Recorder:
    """A stand-in optimizer: keeps the master gradients it is asked to step with."""

    def __init__(self, params):
        self.params = params

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]


def tiny(dtype="fp16", **kw):
    torch.manual_seed(0)
    model = MLSTM(hidden=8, embed=4)
    return model, MixedPrecision(model, dtype, **kw)


def train_step(model, mp, opt, inject=None):
    """One step on a fixed random batch; inject=value puts that value into one compute gradient first."""
    x = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    mp.backward(loss_fn(model(x)[0], x))
    if inject is not None:
        mp.params[1].grad.view(-1)[3] = inject
    return mp.step(opt)


def bits(t):
    """The raw bits of a tensor: equal bits are bit-identity (no 0.0 == -0.0, no NaN != NaN)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def leaves(obj):
    if isinstance(obj, dict):
        return [x for k in sorted(obj, key=str) for x in leaves(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in leaves(v)]
    return [obj]


def identical(a, b):
    la, lb = leaves(a), leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(bits(x), bits(y)) if torch.is_tensor(x) else x == y for x, y in zip(la, lb))


def test_masters_are_float32_and_the_compute_model_half():
    for dtype, compute in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model, mp = tiny(dtype)
        torch.manual_seed(0)
        ref = list(MLSTM(hidden=8, embed=4).parameters())  # the same float32 initialisation
        assert all(m.dtype == torch.float32 and torch.equal(m, r) for m, r in zip(mp.masters, ref))
        assert all(p is q for p, q in zip(model.parameters(), mp.params)), "the model's own parameters compute"
        assert all(p.dtype == compute and torch.equal(p, r.to(compute)) for p, r in zip(mp.params, ref))
        assert float(mp.scale) == (2.0**16 if dtype == "fp16" else 1.0)
    model, mp = tiny("fp32")
    assert mp.masters is mp.params and float(mp.scale) == 1.0


def test_underflow_is_lost_without_scaling_and_survives_with_it():
    got = {}
    for scale in (1.0, 2.0**16):
        lin = torch.nn.Linear(3, 1, bias=False)
        mp = MixedPrecision(lin, "fp16", init_scale=scale, dynamic=False)
        # dL/dy = 1e-8 per row: below fp16's smallest subnormal 2^-24 ~ 6e-8 (under 2^-25 it rounds to 0)
        mp.backward(lin(torch.ones(4, 3, dtype=torch.float16)).float().sum() * 1e-8)
        rec = Recorder(mp.masters)
        mp.step(rec)
        got[scale] = rec.grads[0].double()
    want = torch.full((1, 3), 4 * 1e-8, dtype=torch.float64)  # float64: 4 rows x 1e-8 x input 1
    assert torch.equal(got[1.0], torch.zeros_like(want)), f"unscaled fp16 gradient {got[1.0]} should be lost"
    rel = ((got[2.0**16] - want).abs() / want).max().item()
    assert rel < 1e-3, f"scaled gradient {got[2.0**16]} vs float64 {want}: max relative diff {rel}"  # fp16: 2^-11


# Two ways to skip: the host reads the overflow flag and does not call a plain optimizer (one sync), or
# fused Adam (MixedPrecision.optimizer, what train.py uses) reads the flag on the device (no sync).
OPTIMIZERS = {"host": lambda mp, lr: torch.optim.Adam(mp.masters, lr=lr, foreach=False),
              "device": lambda mp, lr: mp.optimizer(lr)}


@pytest.mark.parametrize("skip", OPTIMIZERS)
def test_overflow_skips_the_step_bit_identically_and_halves_the_scale(skip):
    model, mp = tiny("fp16", init_scale=1024.0)
    opt = OPTIMIZERS[skip](mp, 1e-2)
    for _ in range(2):  # Adam's moments and step counts exist and are nonzero
        assert train_step(model, mp, opt)[1]
    for k, bad in enumerate((INF, float("nan"))):
        before = [copy.deepcopy(x) for x in (mp.masters, mp.params, opt.state_dict())]
        norm, taken = train_step(model, mp, opt, inject=bad)
        after = [mp.masters, mp.params, opt.state_dict()]
        assert not taken and not torch.isfinite(norm)
        for what, b, a in zip(("masters", "fp16 params", "optimizer state"), before, after):
            assert identical(b, a), f"{what} changed on a skipped step ({bad} injected)"
        assert mp.state_dict() == {"scale": 1024.0 / 2 ** (k + 1), "good_steps": 0, "skipped": k + 1}
        assert all(p.grad is None for p in mp.params + mp.masters)
    assert train_step(model, mp, opt)[1] and not identical(before[0], mp.masters), "the next good step moves"


def test_scale_doubles_after_exactly_growth_interval_good_steps():
    model, mp = tiny("fp16", init_scale=4.0, growth_interval=5)
    opt = torch.optim.SGD(mp.masters, lr=1e-3)
    scales = []
    for k in range(20):
        train_step(model, mp, opt, inject=INF if k == 7 else None)
        scales.append(float(mp.scale))
    # Steps 1..5 good: S doubles at step 5, not before. The overflow at step 8 halves S and restarts the
    # count: 5 more good steps (9..13) double it at 13, 5 more at 18.
    want = [4.0] * 4 + [8.0] * 3 + [4.0] * 5 + [8.0] * 5 + [16.0] * 3
    assert scales == want, f"scales {scales} vs {want}"


@pytest.mark.parametrize("skip", OPTIMIZERS)
def test_scale_sequence_equals_torch_amp_gradscaler(skip):
    overflow = {0, 1, 2, 6, 7, 14, 15, 16, 17, 24, 31}  # scripted: a burst at the start, then scattered
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 2)
    model = copy.deepcopy(ref)
    mp = MixedPrecision(model, "fp16", init_scale=2.0**16, growth_interval=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    opt_ref, opt = torch.optim.Adam(ref.parameters(), lr=0.1, foreach=False), OPTIMIZERS[skip](mp, 0.1)
    x = torch.randn(8, 4)
    ours, theirs, taken_ours, taken_theirs = [], [], [], []
    for k in range(36):
        bad = INF if k in overflow else None
        scaler.scale(ref(x).square().mean()).backward()
        if bad:
            ref.weight.grad[0, 0] = bad
        w = ref.weight.detach().clone()
        scaler.step(opt_ref)
        scaler.update()
        opt_ref.zero_grad()
        theirs.append(scaler.get_scale())
        taken_theirs.append(not torch.equal(w, ref.weight))
        mp.backward(model(x.half()).float().square().mean())
        if bad:
            mp.params[0].grad[0, 0] = bad
        taken_ours.append(bool(mp.step(opt)[1]))
        ours.append(float(mp.scale))
    assert ours == theirs, f"scales: ours {ours} vs GradScaler {theirs}"
    assert taken_ours == taken_theirs == [k not in overflow for k in range(36)]
    assert len(set(ours)) > 3, "the script should move the scale both ways"


def test_skipping_on_the_device_equals_skipping_on_the_host():
    overflow = {1, 2, 5, 9}
    runs = {}
    for skip, make in OPTIMIZERS.items():
        model, mp = tiny("fp16", init_scale=2.0**12, growth_interval=2)
        opt = make(mp, 1e-2)
        taken = [bool(train_step(model, mp, opt, inject=INF if k in overflow else None)[1]) for k in range(12)]
        runs[skip] = taken, mp.state_dict(), torch.cat([m.detach().flatten() for m in mp.masters])
    (taken_h, state_h, w_h), (taken_d, state_d, w_d) = runs["host"], runs["device"]
    assert taken_h == taken_d == [k not in overflow for k in range(12)], f"taken {taken_h} vs {taken_d}"
    assert state_h == state_d, f"scaler state {state_h} vs {state_d}"
    # fused and single-tensor Adam round differently (measured: max diff 6e-8, weights up to 4.1)
    diff = (w_h - w_d).abs().max().item()
    assert diff <= 1e-6 * w_h.abs().max().item(), f"device vs host skipping: max weight diff {diff}"


def test_a_training_step_reads_no_tensor_value_back_in_python(monkeypatch):
    """The CPU stand-in for the GPU test below: train.py's step (lr, forward, backward, fp16 step with the
    fused Adam, overflows included) with every Python way of reading a tensor's value made to raise."""
    torch.manual_seed(0)
    model = MLSTM(hidden=16, embed=8)
    mp = MixedPrecision(model, "fp16", init_scale=2.0**30, growth_interval=2)  # 2^30 overflows at first
    opt = mp.optimizer(1e-3)
    x = torch.randint(0, 256, (4, 9))

    def read(*args):
        raise AssertionError("a tensor's value was read on the host inside the step")

    state = None
    for step in range(6):
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__"):
                m.setattr(torch.Tensor, name, read)
            opt.param_groups[0]["lr"].copy_(train.lr_at(step - mp.skipped, 1e-3, 2, 6))
            logits, state = model(x[:, :-1], state)
            state = detach_state(state)
            mp.backward(loss_fn(logits, x[:, 1:]))
            mp.step(opt, clip=1.0)
    assert mp.state_dict()["skipped"] > 0 and float(mp.scale) < 2.0**30, "the first steps should overflow"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_training_step_never_waits_for_the_gpu():
    torch.manual_seed(0)
    model = MLSTM(hidden=64, embed=16).cuda()
    mp = MixedPrecision(model, "fp16", init_scale=2.0**30, growth_interval=2)  # 2^30 overflows at first
    opt = mp.optimizer(1e-3)
    x = torch.randint(0, 256, (4, 17), device="cuda")
    state = None
    for step in range(6):
        torch.cuda.set_sync_debug_mode("error")  # any host sync in here raises
        try:
            opt.param_groups[0]["lr"].copy_(train.lr_at(step - mp.skipped, 1e-3, 2, 6))
            logits, state = model(x[:, :-1], state)
            state = detach_state(state)
            mp.backward(loss_fn(logits, x[:, 1:]))
            mp.step(opt, clip=1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert mp.state_dict()["skipped"] > 0, "the first steps should overflow and be skipped"


def test_static_scale_never_changes(tmp_path):
    model, mp = tiny("fp16", init_scale=1024.0, growth_interval=2, dynamic=False)
    opt = torch.optim.SGD(mp.masters, lr=1e-3)
    taken = [bool(train_step(model, mp, opt, inject=INF if k in (3, 4) else None)[1]) for k in range(8)]
    assert taken == [True] * 3 + [False] * 2 + [True] * 3 and float(mp.scale) == 1024.0, "overflows skip, S stays"
    m = run(tmp_path, "s", "--iters", "6", "--dtype", "fp16", "--static-loss-scale", "--loss-scale", "1024",
            "--scale-growth", "2")
    assert [e["scale"] for e in m if "scale" in e] == [1024.0] * 6


def test_master_weights_keep_updates_below_fp16_resolution():
    lin = torch.nn.Linear(1, 1, bias=False)
    lin.weight.data.fill_(1.0)
    mp = MixedPrecision(lin, "fp16", init_scale=1024.0, dynamic=False)
    opt = torch.optim.SGD(mp.masters, lr=1.0)
    g, n = 1e-4, 20  # each update is below half of fp16's spacing just below 1.0 (2^-11): 1 - g rounds to 1
    pure = torch.ones((), dtype=torch.float16)  # the same SGD done on an fp16 weight, without a master
    for _ in range(n):
        mp.backward(lin(torch.ones(1, 1, dtype=torch.float16)).float().sum() * g)
        mp.step(opt)
        pure = pure - torch.tensor(g, dtype=torch.float16)
    g_seen = float(torch.tensor(g * 1024.0).half()) / 1024.0  # the gradient as fp16 carries it, unscaled
    want = 1.0 - n * g_seen  # float64
    master, copy16 = mp.masters[0].item(), lin.weight.detach()
    assert abs(master - want) < 1e-6, f"master {master} vs float64 {want}: diff {abs(master - want)}"
    assert pure.item() == 1.0, "without masters the fp16 weight never moves"
    assert copy16.item() != 1.0 and torch.equal(copy16, mp.masters[0].detach().half()), "the fp16 copy follows"


def test_clipping_applies_to_the_unscaled_master_gradients():
    for dtype in ("fp16", "fp32"):
        model, mp = tiny(dtype, init_scale=1024.0)
        x = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
        mp.backward(loss_fn(model(x)[0], x))
        unscaled = [p.grad.float() / mp.scale for p in mp.params]  # exact: S is a power of two
        total = torch.cat([g.flatten() for g in unscaled]).double().norm().item()
        for clip in (total / 4, total * 4):  # clipping active, then not
            ref = [torch.nn.Parameter(m.detach().clone()) for m in mp.masters]
            for r, g in zip(ref, unscaled):
                r.grad = g.clone()
            ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip)
            grads = [p.grad.clone() for p in mp.params]
            rec = Recorder(mp.masters)
            norm, taken = mp.step(rec, clip=clip)
            for p, g in zip(mp.params, grads):  # the same gradients again for the second clip value
                p.grad = g
            diff = max((a - r.grad).abs().max().item() for a, r in zip(rec.grads, ref))
            biggest = max(r.grad.abs().max().item() for r in ref)
            assert taken and diff <= 1e-6 * biggest, f"{dtype} clip {clip:.3g}: max diff {diff} vs clip_grad_norm_"
            assert abs(norm.item() - ref_norm.item()) <= 1e-6 * total, f"norm {norm.item()} vs {ref_norm.item()}"
            assert abs(norm.item() - total) <= 1e-5 * total, f"norm {norm.item()} vs float64 {total}"


def test_fp16_and_bf16_track_the_fp32_losses(tmp_path):
    curves = {d: losses(run(tmp_path, d, "--iters", "20", "--lr", "1e-2", "--dtype", d))
              for d in ("fp32", "fp16", "bf16")}
    assert curves["fp32"][-1] < curves["fp32"][0] - 1.0, "the reference run should learn"
    for d in ("fp16", "bf16"):
        # Measured with torch 2.13.0 on CPU: fp16 within 5e-4 nats, bf16 within 1.1e-3, over 20 steps
        # in which the loss falls by ~1.4. 0.02 nats stays far below the ~0.07 a step of learning.
        diff = max(abs(a - b) for a, b in zip(curves[d], curves["fp32"]))
        assert len(curves[d]) == 20 and diff < 0.02, f"{d} vs fp32 losses: max |diff| {diff}"


def test_skipped_steps_do_not_advance_the_lr_schedule(tmp_path):
    # 2^24 overflows this model's fp16 gradients: the first steps are skipped while S halves to ~2^18
    m = [e for e in run(tmp_path, "o", "--iters", "10", "--warmup", "8", "--dtype", "fp16", "--loss-scale",
                        str(2**24)) if "loss" in e]
    skipped_before = [0] + [e["skipped"] for e in m[:-1]]
    assert m[-1]["skipped"] >= 3, f"expected early overflows, got {m[-1]['skipped']} skipped steps"
    want = [float(train.lr_at(k - s, 2e-3, 8, 10)) for k, s in enumerate(skipped_before)]
    assert [e["lr"] for e in m] == pytest.approx(want, rel=1e-12), f"lr {[e['lr'] for e in m]} vs {want}"


def test_fp16_resume_is_bit_identical(tmp_path):
    # Overflows, halvings and growths (2^24 start, growth every 3 good steps), stopped mid growth count.
    flags = ("--dtype", "fp16", "--loss-scale", str(2**24), "--scale-growth", "3", "--iters", "14")
    straight = run(tmp_path, "straight", *flags)
    first = run(tmp_path, "resumed", *flags, "--stop-at", "8")
    resumed = run(tmp_path, "resumed", *flags, "--resume")[len(first):]
    key = lambda ms: [(e["loss"], e["scale"], e["skipped"]) for e in ms if "loss" in e]
    assert key(first + resumed) == key(straight), f"resumed {key(first + resumed)} vs straight {key(straight)}"
    logged = [e for e in straight if "scale" in e]
    assert len({e["scale"] for e in logged}) > 2 and logged[-1]["skipped"] > 0, "the run should skip and grow"
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    for part in ("model", "optimizer", "scaler", "state"):
        assert identical(a[part], b[part]), f"checkpoint {part} differs after resume"


def test_grad_histogram_counts_match_numpy(capsys):
    torch.manual_seed(0)
    model = MLSTM(hidden=8, embed=4)
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 256, (4, 6), generator=gen), torch.randint(0, 256, (4, 6), generator=gen))
               for _ in range(2)]
    scales = [2.0**-10, 1.0, 2.0**16, 2.0**30]  # 2^-10 and 2^30 push some values to zero and to inf
    hist, fates = grad_histogram.grad_histogram(model, batches, scales)
    grads, state = [], None
    for x, y in batches:
        logits, state = reference(x, state)
        state = detach_state(state)
        reference.zero_grad()
        loss_fn(logits, y).backward()
        grads += [p.grad.numpy().ravel() for p in reference.parameters()]
    g = np.abs(np.concatenate(grads)).astype(np.float64)
    g = g[g != 0]
    e = np.floor(np.log2(g)).astype(np.int64)
    want = np.bincount(e + 149, minlength=grad_histogram.BINS)
    assert (hist.numpy() == want).all(), f"histogram differs in {np.flatnonzero(hist.numpy() != want) - 149}"
    with np.errstate(over="ignore"):
        for s, got in zip(scales, fates.numpy()):
            h = np.abs((g * s).astype(np.float16))
            ref = [len(g), (h == 0).sum(), ((h != 0) & (h < np.finfo(np.float16).tiny)).sum(), np.isinf(h).sum()]
            assert list(got) == ref, f"x{s:g}: [all, zero, subnormal, inf] {list(got)} vs numpy {ref}"
    assert (fates[:, 1:].max(0).values > 0).all(), f"every fate should occur at some scale: {fates}"
    grad_histogram.report(hist, fates, scales)
    h, top = np.abs(g.astype(np.float16)), e.max()
    line = (f"x1: 0.000% round to zero in fp16, {100 * ((h != 0) & (h < 2.0**-14)).mean():.3f}% subnormal, 0.000% "
            f"overflow; largest |g| in [2^{top}, 2^{top + 1}): {15 - top} powers of two unused")
    assert line in capsys.readouterr().out, line


def test_grad_histogram_command(tmp_path, capsys):
    run(tmp_path, "a", "--iters", "2")
    data_flags = ["--data", corpus(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4",
                  "--seq-len", "16", "--steps", "2", "--png", str(tmp_path / "h.png")]
    for what in ("ckpt.pt", "config.json", ""):  # a checkpoint, a fresh model from a config, the --out folder
        grad_histogram.main(["--grad-histogram", str(tmp_path / "a" / what), *data_flags])
        out = capsys.readouterr().out
        assert re.search(r"x1: .*% round to zero in fp16, .*% subnormal, .* powers of two unused", out), out
        assert "x65536: " in out
    (tmp_path / "bad.json").write_text("{}")
    for what, msg in (("nowhere.pt", "no such checkpoint"), (corpus(tmp_path), "not a usable mLSTM checkpoint"),
                      (str(tmp_path / "bad.json"), "not a train.py config.json")):
        with pytest.raises(SystemExit, match=msg):
            grad_histogram.main(["--grad-histogram", what, *data_flags])
    for scale in ("nan", "inf", "0"):
        with pytest.raises(SystemExit):
            grad_histogram.main(["--grad-histogram", "demo", *data_flags, "--scale", scale])
        err = capsys.readouterr().err
        assert "and --scale must be positive (--scale finite)" in err, f"--scale {scale}: {err}"
