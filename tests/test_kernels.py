"""kernels.py's fused Triton gate kernels against mlstm.Recurrence's plain-torch gate math (the reference),
and against float64. On a CPU the kernels run in Triton's interpreter (conftest.py), on a GPU compiled."""
import pytest
import torch

from mlstm import MLSTM, Recurrence, detach_state, loss_fn
from test_mlstm import NAMES, outputs_and_grads, recurrence_inputs

pytest.importorskip("triton", reason="kernels.py needs Triton (in torch's CUDA wheels; pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fused(*inputs):
    return Recurrence.apply(*inputs, True)


def on_device(inputs, grads, dtype):
    return ([x.detach().to(DEVICE, dtype).requires_grad_() for x in inputs], [g.to(DEVICE, dtype) for g in grads])


def rel_err(a, r):
    return ((a.double().cpu() - r.double().cpu()).abs().max() / r.double().cpu().abs().max()).item()


@pytest.mark.parametrize("with_final", [True, False])
@pytest.mark.parametrize("T,B,H", [(7, 3, 40), (3, 2, 1030)])
def test_fused_recurrence_equals_plain_float32(with_final, T, B, H):
    """H = 40: one block of 64 units, partly masked; H = 1030: two blocks of 1024, the second almost all masked.
    Without gradients on h_T, c_T they arrive as zeros."""
    inputs, grads = on_device(*recurrence_inputs(T, B, H), torch.float32)
    ours = outputs_and_grads(fused, inputs, grads, with_final)
    ref = outputs_and_grads(Recurrence.apply, inputs, grads, with_final)
    for name, a, r in zip(NAMES, ours, ref):
        err = rel_err(a, r)  # measured: <= 6e-7
        assert err < 1e-5, f"{name} (H {H}, gradients on h_T, c_T: {with_final}): max |diff| / max |plain| = {err:.2e}"


def test_fused_recurrence_takes_a_broadcast_output_gradient():
    """hs.sum(): dL/dhs arrives as an expanded tensor (all strides 0), read through its strides."""
    inputs, _ = on_device(*recurrence_inputs(T=5, B=2, H=24), torch.float32)
    results = []
    for fn in (fused, Recurrence.apply):
        hs, h, c = fn(*inputs)
        results.append(torch.autograd.grad(hs.sum() + c.sum(), inputs))
    for name, a, r in zip(NAMES[3:], *results):
        err = rel_err(a, r)
        assert err < 1e-5, f"{name}: max |diff| / max |plain| = {err:.2e}"


def test_fused_recurrence_low_precision_agrees_with_float64():
    """The same bounds as the plain path's test_recurrence_low_precision_agrees_with_float64.
    Measured (interpreter): fp16 1.3e-3 (plain 1.6e-3), bf16 2.0e-2 (plain 1.4e-2)."""
    inputs, grads = recurrence_inputs(T=16, B=8, H=32)
    ref = outputs_and_grads(Recurrence.apply, inputs, grads)
    for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 5e-2)):
        ours = outputs_and_grads(fused, *on_device(inputs, grads, dtype))
        for name, a, r in zip(NAMES, ours, ref):
            assert a.dtype == dtype, f"{name}: {a.dtype}, not {dtype}"
            err = rel_err(a, r)
            assert err < tol, f"{name} in {dtype}: max |diff| / max |float64| = {err:.2e} >= {tol}"


def test_model_with_triton_equals_plain_over_carried_windows():
    """MLSTM.triton = True (train.py --triton) against the plain model: two training windows with the
    state carried, gradients from the loss through the [B, T, H] -> time-major transpose (strided dL/dhs)."""
    torch.manual_seed(6)
    plain = MLSTM(hidden=48, embed=8).to(DEVICE)
    ours = MLSTM(hidden=48, embed=8).to(DEVICE)
    ours.load_state_dict(plain.state_dict())
    ours.triton = True
    states = [plain.zero_state(4), ours.zero_state(4)]
    for window in range(2):
        x, y = torch.randint(0, 256, (2, 4, 9), device=DEVICE)
        results = []
        for k, model in enumerate((plain, ours)):
            logits, state = model(x, states[k])
            states[k] = detach_state(state)
            loss = loss_fn(logits, y)
            grads = torch.autograd.grad(loss, list(model.parameters()))
            results.append([("loss", loss), ("h", state[0]), ("c", state[1])] +
                           list(zip([n for n, _ in model.named_parameters()], grads)))
        for (name, r), (_, a) in zip(*results):
            err = rel_err(a, r)
            assert err < 1e-5, f"window {window}, {name}: max |diff| / max |plain| = {err:.2e}"
