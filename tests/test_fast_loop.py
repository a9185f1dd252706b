"""fast/loop.py, the training loop's fast paths, against the plain loop of mlstm.cell: the hand-written backward
against autograd in float64 and gradcheck, recompute against the saved activations, CUDA graphs against eager."""
import pytest
import torch

from fast import loop
from fast.loop import Recurrence
from mlstm import MLSTM, cell, detach_state, loss_fn


def autograd_loop(xm, xz, h, c, wh, wmh):
    """The reference for Recurrence: `cell` per timestep under autograd, time-major like it."""
    hs = []
    for xm_t, xz_t in zip(xm.unbind(0), xz.unbind(0)):
        h, c = cell(xm_t, xz_t, h, c, wh, wmh)
        hs.append(h)
    return torch.stack(hs, 0), h, c


def recurrence_inputs(T, B, H, dtype=torch.float64, seed=4):
    """xm xz h0 c0 wh wmh at the scale the model sees (z of variance ~1), and gradients for all 3 outputs."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale
    inputs = (r(T, B, H), r(T, B, 4 * H), r(B, H), r(B, H), r(H, 4 * H, scale=H**-0.5), r(H, H, scale=H**-0.5))
    grads = (r(T, B, H), r(B, H), r(B, H))
    return [x.to(dtype).requires_grad_() for x in inputs], [d.to(dtype) for d in grads]


def outputs_and_grads(fn, inputs, grads, with_final=True):
    """fn's outputs (hs, h_T, c_T) and the gradients of all six inputs of sum(out * grad)."""
    out = fn(*inputs)
    pairs = zip(out, grads) if with_final else [(out[0], grads[0])]
    loss = sum((o * g).sum() for o, g in pairs)
    return [o.detach() for o in out] + list(torch.autograd.grad(loss, inputs))


NAMES = ("hs", "h_T", "c_T", "d xm", "d xz", "d h0", "d c0", "d wh", "d wmh")


def test_recurrence_equals_autograd_loop_float64():
    for with_final in (True, False):
        inputs, grads = recurrence_inputs(T=9, B=3, H=6)
        ours = outputs_and_grads(Recurrence.apply, inputs, grads, with_final)
        ref = outputs_and_grads(autograd_loop, inputs, grads, with_final)
        for name, a, r in zip(NAMES, ours, ref):
            err = (a - r).abs().max().item()
            assert err < 1e-10, f"{name} (gradients on h_T, c_T: {with_final}): max |diff| {err}"


def test_model_gradients_equal_autograd_loop_float64():
    """MLSTM.forward with train.py's FastLoop (Recurrence) against the model's own autograd loop of `cell`."""
    for use_wn in (True, False):
        for with_state in (True, False):
            torch.manual_seed(5)
            model = MLSTM(hidden=10, embed=6, weight_norm=use_wn).double()
            with torch.no_grad():
                for n in ("gx", "gh", "gmx", "gmh") if use_wn else ():
                    getattr(model, n).mul_(torch.rand_like(getattr(model, n)) + 0.5)
                model.b.normal_()
            x = torch.randint(0, 256, (4, 13))
            h0, c0 = (torch.randn(4, 10, dtype=torch.float64, requires_grad=True) for _ in "hc")
            # Gradients on the logits and on the final state (h, c), as a loss would send them.
            wl, wh, wc = (torch.randn(*s, dtype=torch.float64) for s in ((4, 13, 256), (4, 10), (4, 10)))
            inputs = list(model.parameters()) + ([h0, c0] if with_state else [])
            results = []
            for fast in (loop.FastLoop(), None):
                logits, (h, c) = model(x, (h0, c0) if with_state else None, loop=fast)
                if fast:  # really the Function, and a final state that is not a view of its buffers
                    assert type(h.grad_fn).__name__ == "RecurrenceBackward" and h._base is None and c._base is None
                loss = (logits * wl).sum() + (h * wh).sum() + (c * wc).sum()
                results.append([logits.detach(), h.detach(), c.detach()] + list(torch.autograd.grad(loss, inputs)))
            names = ["logits", "h_T", "c_T"] + [n for n, _ in model.named_parameters()] + ["h0", "c0"]
            for name, a, r in zip(names, *results):
                err = (a - r).abs().max().item()
                assert err < 1e-10, f"{name} (weight_norm={use_wn}, state={with_state}): max |diff| {err}"


def test_recurrence_gradcheck_float64():
    inputs, _ = recurrence_inputs(T=4, B=2, H=3)
    assert torch.autograd.gradcheck(Recurrence.apply, inputs, eps=1e-6, atol=1e-7)


def test_recurrence_low_precision_agrees_with_float64():
    """float32 / float16 / bfloat16 runs against float64: max |diff| relative to the float64 values' largest."""
    inputs, grads = recurrence_inputs(T=16, B=8, H=32)
    ref = outputs_and_grads(Recurrence.apply, inputs, grads)
    # Measured: ~7e-7, ~2e-3, ~1.5e-2, as for the autograd loop in the same dtype.
    for dtype, tol in ((torch.float32, 5e-6), (torch.float16, 5e-3), (torch.bfloat16, 5e-2)):
        low_inputs = [x.detach().to(dtype).requires_grad_() for x in inputs]
        ours = outputs_and_grads(Recurrence.apply, low_inputs, [g.to(dtype) for g in grads])
        for name, a, r in zip(NAMES, ours, ref):
            assert a.dtype == dtype, f"{name}: {a.dtype}, not {dtype}"
            err = ((a.double() - r).abs().max() / r.abs().max()).item()
            assert err < tol, f"{name} in {dtype}: max |diff| / max |float64| = {err:.2e} >= {tol}"


def test_recurrence_refuses_double_backward():
    """An error, not silently missing second-order terms (as with @once_differentiable under weight norm)."""
    model = MLSTM(hidden=4, embed=4).double()
    logits, _ = model(torch.randint(0, 256, (2, 3)), loop=loop.FastLoop())
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad((logits**2).sum(), model.wh, create_graph=True)


def model_grads(model, x, state, wl, wh, wc, fast):
    """Logits, final state and the gradients of every parameter and of the initial state, for weighted sums."""
    logits, (h, c) = model(x, state, loop=fast)
    loss = (logits * wl).sum() + (h * wh).sum() + (c * wc).sum()
    return [logits, h, c] + list(torch.autograd.grad(loss, list(model.parameters()) + list(state)))


def test_recompute_equals_the_saved_activations_float64(monkeypatch):
    """FastLoop(recompute=S) (train.py --recompute) against the same model keeping its activations, for
    segments that divide T, that do not (the last one shorter) and that exceed it."""
    runs = []  # the timesteps of each call of the loop: every segment's forward, then again in backward
    real = loop.recurrence
    monkeypatch.setattr(loop, "recurrence", lambda e, *a: runs.append(len(e)) or real(e, *a))
    torch.manual_seed(6)
    model = MLSTM(hidden=10, embed=6).double()
    x = torch.randint(0, 256, (4, 13))
    state = tuple(torch.randn(4, 10, dtype=torch.float64, requires_grad=True) for _ in "hc")
    weights = [torch.randn(*s, dtype=torch.float64) for s in ((4, 13, 256), (4, 10), (4, 10))]
    ref = model_grads(model, x, state, *weights, loop.FastLoop())
    names = ["logits", "h_T", "c_T"] + [n for n, _ in model.named_parameters()] + ["h0", "c0"]
    for segment in (1, 4, 13, 20):
        runs.clear()
        out = model_grads(model, x, state, *weights, loop.FastLoop(recompute=segment))
        lengths = [min(segment, 13 - t) for t in range(0, 13, segment)]
        assert runs == lengths + lengths[::-1], f"segments of {segment}: loop calls of {runs} timesteps"
        for name, a, r in zip(names, out, ref):
            err = (a - r).abs().max().item()
            assert err < 1e-12, f"{name} with segments of {segment}: max |diff| {err}"


def test_recompute_keeps_only_the_segment_boundaries_from_forward_to_backward():
    """On the CPU, what the time loop keeps for its backward: every tensor autograd saves, seen by a saved-tensors
    hook, each storage counted once and the loop's inputs left out. Recurrence: its 8 [B, H] per timestep
    (fast/loop.py recomputed's docstring) and the initial state; segments of 16: only the h and c handed from one segment to the next
    (each segment's activations then live during its own backward only, which this does not see)."""
    T, B, H, E = 64, 8, 32, 16
    g = torch.Generator().manual_seed(5)
    for segment, want in ((0, 8 * T + 2), (16, 2 * (T // 16 - 1))):  # + 2: h and c stored from h_0 and c_0 on
        args = [torch.randn(*s, generator=g).requires_grad_() for s in ((T, B, E), (E, 4 * H), (4 * H,), (E, H))]
        args += [(torch.randn(*s, generator=g) * H**-0.5).requires_grad_() for s in ((H, 4 * H), (H, H))]
        args += [torch.zeros(B, H), torch.zeros(B, H)]
        inputs, kept = {a.untyped_storage().data_ptr() for a in args}, {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in inputs:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hs, h, c = loop.recomputed(*args, segment) if segment else loop.recurrence(*args)
        (hs.sum() + h.sum() + c.sum()).backward()
        got = sum(kept.values()) / (B * H * 4)
        assert got == want, f"segments of {segment or T}: {got} [B, H] float32 tensors kept, expected {want}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is measured by the CUDA allocator")
def test_recompute_lowers_the_peak_memory_of_a_step():
    """Activation memory of forward + backward at H = 256, B = 64, T = 128, fp16, with and without segments
    of 16: Recurrence holds ~16 [B, H] per timestep at its peak, recompute ~3 plus 16 per timestep of one segment."""
    torch.manual_seed(7)
    model = MLSTM(hidden=256).cuda().half()
    x, y = torch.randint(0, 256, (2, 64, 128), device="cuda")
    loss_fn(model(x, loop=loop.FastLoop())[0], y).backward()  # the parameters' gradients exist before either
    peaks = {}
    for segment in (0, 16):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_fn(model(x, loop=loop.FastLoop(recompute=segment))[0], y).backward()
        peaks[segment] = torch.cuda.max_memory_allocated() - base
    assert peaks[16] < 0.6 * peaks[0], f"peak activation bytes: {peaks[16]} with recompute, {peaks[0]} without"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("triton", [False, True])
def test_cuda_graph_replays_equal_the_eager_step(dtype, triton):
    """train.py --cuda-graph against the eager step: three training windows with the state carried, so that
    the replays (new inputs, weights and state copied in) are checked, not only the capture. With --triton,
    the graph holds kernels.py's kernels and the eager step is the plain one."""
    torch.manual_seed(3)
    eager = MLSTM(hidden=64, embed=16).cuda().to(dtype)
    graphed = MLSTM(hidden=64, embed=16).cuda().to(dtype)
    graphed.load_state_dict(eager.state_dict())
    loops = [loop.FastLoop(), loop.FastLoop(cuda_graph=True, triton=triton)]
    states = [eager.zero_state(8), graphed.zero_state(8)]
    for step in range(3):
        x, y = torch.randint(0, 256, (2, 8, 12), device="cuda")
        results = []
        for k, model in enumerate((eager, graphed)):
            logits, state = model(x, states[k], loop=loops[k])
            states[k] = detach_state(state)
            loss = loss_fn(logits, y)
            loss.backward()
            results.append([("loss", loss), ("h", state[0]), ("c", state[1])] +
                           [(n, p.grad.clone()) for n, p in model.named_parameters()])
            with torch.no_grad():  # a different step each time: the weights move as in training
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
        for (name, a), (_, r) in zip(results[1], results[0]):
            err = ((a.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1e-12)).item()
            tol = 1e-5 if dtype == torch.float32 else 5e-3  # fp16: cuBLAS may pick other kernels; Triton rounds once
            assert err < tol, f"step {step}, {name} in {dtype}: max |diff| / max |eager| = {err:.2e}"
    assert len(loops[1].graphs) == 1  # one capture, replayed for every later window
