"""The mLSTM time loop's gate math fused into two Triton kernels: train.py --triton.

Puri et al. 2018 (arXiv 1808.01371) train the 4096-d mLSTM with fp16 tensor-core GEMMs; what the GEMMs
leave is elementwise. fast/loop.py's Recurrence spends, per timestep, six small kernels forward and five
backward (plus ten over all timesteps) on the gate math of `mlstm.cell` (sigmoid, tanh, the products of c and h),
each reading and writing [B, H] or [B, 4H] tensors, most of them column slices of z that torch runs
unvectorised; elementwise kernels, mostly these, take 39% of the kernel time of a 4096-d step on an H100
(BENCHMARKS.md). Here each direction is one kernel that reads its inputs once, computes in float32
registers and writes once: on an H200 this takes a 4096-d fp16 step at batch 1024 from 42% to 54% MFU
(BENCHMARKS.md). Recurrence calls them in place of its plain-torch lines when fused=True;
those stay the readable reference that tests/test_kernels.py compares these with (on a CPU in Triton's
interpreter, TRITON_INTERPRET=1, and compiled for the H100 to check the PTX; on a GPU compiled and run).

One program per (batch row b, block of BLOCK hidden units j); [B, 4H] rows hold the gates i | f | o | u.

    python train.py --data corpus.jsonl.gz --hidden 4096 --batch-size 512 --dtype fp16 --triton
    python tools/bench.py --hidden 4096 --batch-size 512 --seq-len 256 --dtype fp16 --device cuda --only ours,triton
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: tl.sigmoid exists on every backend and in the interpreter, a tanh does not.
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _forward(z, xz, c_prev, c, h, H, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < H
    g, s = b * 4 * H + j, b * H + j  # [b, j] of the [B, 4H] rows (gate i; + H for f, ...) and of the [B, H] states
    zb, xb = z + g, xz + g
    # z_t = W_x x_t + b + W_h m_t;  i, f, o = sigmoid(.);  u = tanh(.)
    i = tl.sigmoid(tl.load(xb, mask=mask).to(tl.float32) + tl.load(zb, mask=mask).to(tl.float32))
    f = tl.sigmoid(tl.load(xb + H, mask=mask).to(tl.float32) + tl.load(zb + H, mask=mask).to(tl.float32))
    o = tl.sigmoid(tl.load(xb + 2 * H, mask=mask).to(tl.float32) + tl.load(zb + 2 * H, mask=mask).to(tl.float32))
    u = _tanh(tl.load(xb + 3 * H, mask=mask).to(tl.float32) + tl.load(zb + 3 * H, mask=mask).to(tl.float32))
    # c_t = f * c_{t-1} + i * u
    ct = f * tl.load(c_prev + s, mask=mask).to(tl.float32) + i * u
    # h_t = o * tanh(c_t)
    tc = _tanh(ct)
    # The gates replace z (backward needs them, not z), as in mlstm.Recurrence.
    dtype = z.dtype.element_ty
    tl.store(zb, i.to(dtype), mask=mask)
    tl.store(zb + H, f.to(dtype), mask=mask)
    tl.store(zb + 2 * H, o.to(dtype), mask=mask)
    tl.store(zb + 3 * H, u.to(dtype), mask=mask)
    tl.store(c + s, ct.to(c.dtype.element_ty), mask=mask)
    tl.store(h + s, (o * tc).to(h.dtype.element_ty), mask=mask)


@triton.jit
def _backward(dz, gates, c_prev, c, dh, dhs, dhs_row, dhs_col, dc, dc_prev, H, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < H
    gb, s = b * 4 * H + j, b * H + j
    i = tl.load(gates + gb, mask=mask).to(tl.float32)
    f = tl.load(gates + gb + H, mask=mask).to(tl.float32)
    o = tl.load(gates + gb + 2 * H, mask=mask).to(tl.float32)
    u = tl.load(gates + gb + 3 * H, mask=mask).to(tl.float32)
    cp = tl.load(c_prev + s, mask=mask).to(tl.float32)
    # tanh(c_t) again, in registers: cheaper than a [T, B, H] buffer saved by the forward and read back
    tc = _tanh(tl.load(c + s, mask=mask).to(tl.float32))
    # dh_t = dL/dh_t (from the output; any strides, e.g. a transposed [B, T, H] gradient) + dh_t (from t+1)
    dhs_t = tl.load(dhs + b * dhs_row + j * dhs_col, mask=mask).to(tl.float32)
    dh_t = tl.load(dh + s, mask=mask).to(tl.float32) + dhs_t
    # dc_t = dc_t (from t+1) + dh_t * o (1 - tanh^2(c_t))
    dc_t = tl.load(dc + s, mask=mask).to(tl.float32) + dh_t * o * (1 - tc * tc)
    dtype = dz.dtype.element_ty
    # dz_i = dc_t * u i(1-i);  dz_f = dc_t * c_{t-1} f(1-f);  dz_o = dh_t * tanh(c_t) o(1-o);  dz_u = dc_t * i (1-u^2)
    tl.store(dz + gb, (dc_t * u * i * (1 - i)).to(dtype), mask=mask)
    tl.store(dz + gb + H, (dc_t * cp * f * (1 - f)).to(dtype), mask=mask)
    tl.store(dz + gb + 2 * H, (dh_t * tc * o * (1 - o)).to(dtype), mask=mask)
    tl.store(dz + gb + 3 * H, (dc_t * i * (1 - u * u)).to(dtype), mask=mask)
    # dc_{t-1} = dc_t * f_t
    tl.store(dc_prev + s, (dc_t * f).to(dc_prev.dtype.element_ty), mask=mask)


def _grid(B, H):
    block = min(1024, triton.next_power_of_2(H))
    return (B, triton.cdiv(H, block)), block


def forward_step(z, xz, c_prev, c, h):
    """z [B, 4H] = m W_h, to which xz = x W_x + b is added here (not by the GEMM: torch's addmm copies xz into
    its output first) -> the gates i f o u in place of z; writes c_t, h_t [B, H].
    All contiguous (slices of mlstm.Recurrence's time-major buffers)."""
    B, H = c.shape
    grid, block = _grid(B, H)
    _forward[grid](z, xz, c_prev, c, h, H, BLOCK=block)


def backward_step(dz, gates, c_prev, c, dh, dhs, dc):
    """One reverse step's gate math: writes dz_t [B, 4H] (dz may be gates itself: every element is read
    before it is written); returns dc_{t-1} [B, H]. dh (from step t+1) and dhs (dL/dh_t from the output,
    any strides) are added here; dh and dc may be any [B, H]."""
    B, H = dc.shape
    dh, dc = dh.contiguous(), dc.contiguous()  # no-ops but for the final state's gradients
    dc_prev = torch.empty_like(dc)
    grid, block = _grid(B, H)
    _backward[grid](dz, gates, c_prev, c, dh, dhs, dhs.stride(0), dhs.stride(1), dc, dc_prev, H, BLOCK=block)
    return dc_prev
