"""kernels.py's fused Triton gate kernels against mlstm.Recurrence's plain-torch gate math (the reference),
and against float64. On a CPU the kernels run in Triton's interpreter (conftest.py) and are also compiled for
the H100 to check their PTX; on a GPU they are compiled and run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fast.loop import FastLoop, Recurrence
from mlstm import MLSTM, detach_state, loss_fn
from test_fast_loop import NAMES, outputs_and_grads, recurrence_inputs

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
    Measured (interpreter): fp16 1.3e-3 (plain 1.6e-3), bf16 2.0e-2 (plain 1.4e-2): Triton's interpreter
    truncates float32 to bfloat16, twice the error of the round-to-nearest in the compiled kernel's PTX."""
    inputs, grads = recurrence_inputs(T=16, B=8, H=32)
    ref = outputs_and_grads(Recurrence.apply, inputs, grads)
    for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 5e-2)):
        ours = outputs_and_grads(fused, *on_device(inputs, grads, dtype))
        for name, a, r in zip(NAMES, ours, ref):
            assert a.dtype == dtype, f"{name}: {a.dtype}, not {dtype}"
            err = rel_err(a, r)
            assert err < tol, f"{name} in {dtype}: max |diff| / max |float64| = {err:.2e} >= {tol}"


@pytest.mark.parametrize("recompute", [0, 4])
def test_model_with_triton_equals_plain_over_carried_windows(recompute):
    """FastLoop(triton=True) (train.py --triton) against the plain one: two training windows with the
    state carried, gradients from the loss through the [B, T, H] -> time-major transpose (strided dL/dhs);
    also with --recompute 4 (segments of 4, 4 and 1 timesteps, re-run in backward)."""
    torch.manual_seed(6)
    plain = MLSTM(hidden=48, embed=8).to(DEVICE)
    ours = MLSTM(hidden=48, embed=8).to(DEVICE)
    ours.load_state_dict(plain.state_dict())
    loops = [FastLoop(), FastLoop(triton=True, recompute=recompute)]
    states = [plain.zero_state(4), ours.zero_state(4)]
    for window in range(2):
        x, y = torch.randint(0, 256, (2, 4, 9), device=DEVICE)
        results = []
        for k, model in enumerate((plain, ours)):
            logits, state = model(x, states[k], loop=loops[k])
            states[k] = detach_state(state)
            loss = loss_fn(logits, y)
            grads = torch.autograd.grad(loss, list(model.parameters()))
            results.append([("loss", loss), ("h", state[0]), ("c", state[1])] +
                           list(zip([n for n, _ in model.named_parameters()], grads)))
        for (name, r), (_, a) in zip(*results):
            err = rel_err(a, r)
            assert err < 1e-5, f"window {window}, {name}: max |diff| / max |plain| = {err:.2e}"


COMPILE = """
import collections, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fast import kernels
out = {}
for ty in ("fp16", "bf16", "fp32"):
    for fn in (kernels._forward, kernels._backward):
        # As Triton's JIT specialises at a launch: ints equal to 1 become constants, pointers (16-byte aligned)
        # and ints divisible by 16 are marked so (H, and dhs_row = T*H, are multiples of 16 in practice).
        consts = {"BLOCK": 1024, "dhs_col": 1}
        sig = {n: "constexpr" if n in consts else "i32" if n in ("H", "dhs_row") else "*" + ty for n in fn.arg_names}
        attrs = {(k,): [["tt.divisibility", 16]] for k, n in enumerate(fn.arg_names) if n not in consts}
        src = ASTSource(fn, sig, {n: v for n, v in consts.items() if n in sig}, attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        out[ty + fn.__name__] = collections.Counter(re.findall(r"(?:ld|st)[.]global[.a-z0-9]*", ptx))
print(json.dumps(out))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above compile and run the kernels")
def test_kernels_compile_for_the_h100_with_each_tensor_read_and_written_once_in_128_bit_accesses():
    """Triton's interpreter is more lenient than its compiler: compile both kernels for sm_90 (Hopper) to
    PTX and cubin without a GPU, and check the memory traffic in the PTX: one 128-bit (v4.b32) load per
    input tensor and one store per output, per thread of 8 16-bit values (16 fp32 values: two of each)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", COMPILE], cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    for ty, per in (("fp16", 1), ("bf16", 1), ("fp32", 2)):
        # forward: loads the 4 gates of z and of xz, and c_{t-1}; stores the 4 gates, c_t, h_t.
        # backward: loads the 4 gates, c_{t-1}, c_t, dh, dL/dh_t, dc; stores dz's 4 gates and dc_{t-1}.
        for kernel, loads, stores in (("_forward", 9, 6), ("_backward", 9, 5)):
            want = {"ld.global.v4.b32": loads * per, "st.global.v4.b32": stores * per}
            assert got[ty + kernel] == want, f"{kernel} in {ty}: global accesses {got[ty + kernel]}, want {want}"


def test_a_second_backward_through_the_fused_path_is_an_error_not_wrong_gradients():
    """The fused backward writes dz over the saved gates (memory): retain_graph's second pass must refuse."""
    model = MLSTM(hidden=16, embed=8).to(DEVICE)
    x = torch.randint(0, 256, (4, 5), device=DEVICE)
    loss = loss_fn(model(x, loop=FastLoop(triton=True))[0], x)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
