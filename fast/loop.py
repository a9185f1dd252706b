"""The training time loop of mlstm.py, made fast: optimisations, each tested equal to `mlstm.cell`'s loop.

train.py hands a FastLoop to the model (model(x, state, loop=FastLoop(...))) unless --reference-loop asks for
mlstm.py's own loop of `mlstm.cell` under autograd, which is the reference for all of this:

- Recurrence: the loop with a hand-written backward whose weight gradients are one GEMM each over all T*B rows
  (1.4x faster than autograd's loop on a CPU; tests/test_fast_loop.py checks it against `cell` under autograd in
  float64, and with gradcheck).
- recomputed: activation checkpointing in segments (train.py --recompute S): less memory, one more forward.
- graphed: the loop's forward and backward replayed as CUDA graphs (train.py --cuda-graph).
- fused=True: each step's gate math as one Triton kernel per direction (train.py --triton, fast/kernels.py).

    python train.py --hidden 1024 --batch-size 512 --seq-len 256 --dtype fp16 --cuda-graph --triton
    python train.py --hidden 8192 --batch-size 1024 --seq-len 256 --dtype fp16 --recompute 32
"""
import warnings
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

import mlstm  # input_products


class FastLoop:
    """The time loop train.py runs, as its flags ask; none changes the numbers: --cuda-graph replays it as CUDA
    graphs (one pair per input shape, kept in self.graphs), --triton fuses each step's gate math into Triton
    kernels, --recompute S checkpoints it in segments of S timesteps; else the hand-written backward alone.
    Called by MLSTM.rnn as loop(e, wx, b, wmx, wh, wmh, h, c), time-major: e [T, B, E], h c [B, H] ->
    hs [T, B, H], h_T, c_T."""

    def __init__(self, cuda_graph=False, triton=False, recompute=0):
        self.cuda_graph, self.triton, self.recompute, self.graphs = cuda_graph, triton, recompute, {}

    def __call__(self, e, wx, b, wmx, wh, wmh, h, c):
        args = (e, wx, b, wmx, wh, wmh, h, c)
        if self.cuda_graph and e.is_cuda:
            return graphed(self, args)
        if self.recompute:
            return recomputed(*args, self.recompute, self.triton)
        return recurrence(*args, self.triton)


class Recurrence(torch.autograd.Function):
    """The time loop of `mlstm.cell` with a hand-written backward: train.py's default training path.

    Autograd's backward of the loop computes each weight gradient as T GEMMs of only B rows, added up one
    by one (on CPU 1.7x the time of one GEMM over all T*B rows, at H = 256, B = 32), plus the overhead of
    a dozen recorded ops per timestep. Here the reverse loop computes only the data gradients that the
    recurrence needs (dz_t, dm_t, dh_{t-1}, dc_{t-1}); the weight gradients follow as one GEMM each.
    Time-major, so that each step's rows are contiguous: xm [T, B, H], xz [T, B, 4H], h0 c0 [B, H],
    wh [H, 4H], wmh [H, H] -> hs [T, B, H], h_T, c_T [B, H].
    fused=True (train.py --triton) runs each step's gate math as one Triton kernel per direction
    (fast/kernels.py); the plain-torch lines here are the reference that tests/test_kernels.py compares them with.
    """

    @staticmethod
    def forward(ctx, xm, xz, h0, c0, wh, wmh, fused=False):
        T, B, H = xm.shape
        if fused:  # train.py --triton; imported only then, as torch's CPU wheels come without Triton
            from fast import kernels
        # What backward needs, for all timesteps: W_mh h_{t-1}, the gates i f o u (after their
        # nonlinearities), and h_t, c_t from t = 0 (so that h_{t-1} is hs[t]: no concatenation). Not tanh(c_t):
        # backward recomputes it from c_t, one elementwise op against a saved [T, B, H] buffer.
        hm = xm.new_empty(T, B, H)
        gates = xz.new_empty(T, B, 4 * H)
        hs, cs = xm.new_empty(T + 1, B, H), xm.new_empty(T + 1, B, H)
        hs[0], cs[0] = h0, c0
        # Iterating a tensor yields its [B, ...] slices along time; each step writes its own (out=).
        for xm_t, xz_t, hm_t, z, h_prev, c_prev, h, c in zip(xm, xz, hm, gates, hs, cs, hs[1:], cs[1:]):
            # m_t = (W_mx x_t) * (W_mh h_{t-1})
            m = xm_t * torch.mm(h_prev, wmh, out=hm_t)
            if fused:  # z_t's sum and the gate math below in one kernel
                kernels.forward_step(torch.mm(m, wh, out=z), xz_t, c_prev, c, h)
            else:
                # z_t = W_x x_t + W_h m_t + b
                torch.addmm(xz_t, m, wh, out=z)
                # i, f, o = sigmoid(.);  u = tanh(.)   -- in place: backward needs the gates, not z
                z[:, : 3 * H].sigmoid_()
                z[:, 3 * H :].tanh_()
                i, f, o, u = z.chunk(4, 1)  # [B, H] each
                # c_t = f * c_{t-1} + i * u
                torch.addcmul(f * c_prev, i, u, out=c)
                # h_t = o * tanh(c_t)
                torch.mul(o, torch.tanh(c), out=h)
        ctx.fused = fused
        ctx.save_for_backward(xm, wh, wmh, hm, gates, hs, cs)
        # The final state as copies, not views: it is saved in checkpoints and all-gathered.
        return hs[1:], hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx, dhs, dh, dc):
        if torch.is_grad_enabled():  # backward(create_graph=True): this backward is not differentiable
            raise RuntimeError("no double backward through mlstm.Recurrence; MLSTM.rnn(return_cells=True) has one")
        # Outputs that got no gradient arrive as zeros (autograd's default, materialize_grads).
        xm, wh, wmh, hm, gates, hs, cs = ctx.saved_tensors
        T, B, H = xm.shape
        if ctx.fused:
            from fast import kernels
            # dz_t overwrites the gates of step t, which nothing reads after it (the kernel reads each element
            # before writing it): the largest buffer of the backward is not allocated twice. A second backward
            # (retain_graph) then fails autograd's check that saved tensors were not modified, once told of
            # the kernel's writes, which autograd cannot see.
            dz = gates  # [T, B, 4H]
            torch.autograd.graph.increment_version(gates)
        else:
            dz = torch.empty_like(gates)  # [T, B, 4H]
            i, f, o, u = gates.chunk(4, 2)  # [T, B, H] each
            tanh_cs = torch.tanh(cs[1:])  # tanh(c_t) [T, B, H]
            # dz for all t at once: first the factors of dz_t that do not depend on the recurrent gradient,
            # which the reverse loop then multiplies by dc_t (or dh_t) in place.
            dz_i, dz_f, dz_o, dz_u = dz.chunk(4, 2)  # [T, B, H] each
            # dz_i = dc_t * u i(1-i)    (sigmoid' = s(1-s) = s - s*s)
            torch.mul(u, torch.addcmul(i, i, i, value=-1), out=dz_i)
            # dz_f = dc_t * c_{t-1} f(1-f)
            torch.mul(cs[:-1], torch.addcmul(f, f, f, value=-1), out=dz_f)
            # dz_o = dh_t * tanh(c_t) o(1-o)
            torch.mul(tanh_cs, torch.addcmul(o, o, o, value=-1), out=dz_o)
            # dz_u = dc_t * i (1-u^2) = dc_t * (i - i u u)    (tanh' = 1 - tanh^2)
            torch.addcmul(i, i * u, u, value=-1, out=dz_u)
            # dc_t += dh_t * o (1 - tanh^2(c_t)) = dh_t * (o - o tanh tanh), through h_t = o * tanh(c_t)
            o_dtanh = torch.addcmul(o, o * tanh_cs, tanh_cs, value=-1)
        dm, dhm = torch.empty_like(xm), torch.empty_like(xm)
        # Transposed copies: per-step GEMMs with a transposed (column-major) operand ran 1.5x slower on CPU.
        wh_t, wmh_t = wh.t().contiguous(), wmh.t().contiguous()  # [4H, H], [H, H]
        for t in reversed(range(T)):
            if ctx.fused:  # the gate math below, and dz's factors above, in one kernel
                dc = kernels.backward_step(dz[t], gates[t], cs[t], cs[t + 1], dh, dhs[t], dc)
            else:
                # dh_t = dL/dh_t (from the output) + dh_t (from step t+1; at t = T, the final state's)
                dh = dh + dhs[t]
                # dc_t = dc_t (from step t+1) + dh_t * o (1 - tanh^2(c_t))
                dc = torch.addcmul(dc, dh, o_dtanh[t])
                # dz_t: the factors above times dc_t for i f u, dh_t for o  (the four gates in one op)
                dz[t].view(B, 4, H).mul_(torch.stack([dc, dc, dh, dc], 1))  # [B, 4, H]
                # dc_{t-1} = dc_t * f_t
                dc = dc * f[t]
            # dm_t = dz_t W_h^T
            torch.mm(dz[t], wh_t, out=dm[t])
            # d(W_mh h_{t-1}) = dm_t * (W_mx x_t)
            torch.mul(dm[t], xm[t], out=dhm[t])
            # dh_{t-1} = d(W_mh h_{t-1}) W_mh^T  (skipped for a carried state that is detached, as in training)
            if t > 0 or ctx.needs_input_grad[2]:
                dh = dhm[t] @ wmh_t
        # The weight gradients: one GEMM each, summing over all T*B rows.
        m = (xm * hm).view(T * B, H)  # m_t of every step, recomputed: [T*B, H]
        # dW_h = sum_t m_t^T dz_t
        dwh = m.t() @ dz.view(T * B, 4 * H)
        # dW_mh = sum_t h_{t-1}^T d(W_mh h_{t-1});  hs[:-1] = h_0 .. h_{T-1}: [T*B, H]
        dwmh = hs[:-1].view(T * B, H).t() @ dhm.view(T * B, H)
        # d(W_mx x_t) = dm_t * (W_mh h_{t-1})  (in place: dm is not needed any more)
        dxm = dm.mul_(hm)
        # d(W_x x_t + b) = dz_t
        return dxm, dz, dh if ctx.needs_input_grad[2] else None, dc, dwh, dwmh, None


def recurrence(e, wx, b, wmx, wh, wmh, h0, c0, fused=False):
    """The training loop without recompute or graphs, time-major: e [T, B, E], h0 c0 [B, H] -> hs [T, B, H], h_T, c_T."""
    return Recurrence.apply(*mlstm.input_products(e, wx, b, wmx), h0, c0, wh, wmh, fused)


def recomputed(e, wx, b, wmx, wh, wmh, h, c, segment, fused=False):
    """`recurrence` with activation checkpointing (train.py --recompute), in segments of `segment` timesteps.

    Recurrence saves 8 [B, H]-sized tensors per timestep for its backward (xm, W_mh h, 4 gates, h, c) and
    allocates 8 more there (tanh c, o (1 - tanh^2 c), 4 of dz, dm, d(W_mh h); fused=True: only dm, d(W_mh h)).
    Here the forward keeps only each segment's input state and the outputs hs; backward re-runs one segment's
    forward at a time from its state, then its backward. Costs one more forward of the loop: +2 of the 6
    recurrent GEMMs per timestep."""
    hs = []
    for e_seg in e.split(segment):  # [segment, B, E]
        out, h, c = checkpoint(recurrence, e_seg, wx, b, wmx, wh, wmh, h, c, fused,
                               use_reentrant=False, preserve_rng_state=False)  # no randomness to replay
        hs.append(out)
    return torch.cat(hs), h, c  # [T, B, H]


def graphed(loop, args):
    """recurrence(*args) replayed from two CUDA graphs (its forward and its backward), kept in loop.graphs.

    At H = 1024 the loop's ~17 small kernels per timestep take longer to launch from Python than to
    run; a graph launches them all in one call (3.3x faster steps on an H100 at batch 256). Captured on
    first use for each shape (as warm-up steps plus a capture: a few steps' time), then each call copies
    its inputs into the graph's own.
    Its outputs live in the graph's memory, so each forward's backward must run before the next
    forward, as in train.py's loop; state carried between windows is copied in, so it is safe.
    """
    key = tuple((a.shape, a.dtype, a.requires_grad) for a in args) + (loop.triton,)
    if key not in loop.graphs:
        sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        with warnings.catch_warnings():
            # torch warms up on one side stream and captures on another, and warns that the sample
            # inputs' gradient nodes changed streams: it inserts a wait, and the replays are tested equal.
            warnings.filterwarnings("ignore", "The AccumulateGrad node's stream does not match")
            loop.graphs[key] = torch.cuda.make_graphed_callables(partial(recurrence, fused=loop.triton), sample)
    return loop.graphs[key](*args)
