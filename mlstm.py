"""Byte-level multiplicative LSTM (mLSTM) language model.

The model of Radford et al. 2017 ("Learning to Generate Reviews and Discovering Sentiment",
arXiv 1704.01444), after Krause et al. 2016, that Puri et al. 2018 (arXiv 1808.01371) scale to
40 GB of text: 256 byte ids -> 64-d embedding -> one mLSTM layer of H units -> Linear(H, 256).
Weight normalisation (Salimans & Kingma 2016) on the four recurrent-cell matrices, as in the paper.

Parameter names follow the reference model: wx wh wmx wmh (weights), b (bias), gx gh gmx gmh
(weight-norm gains); gates i f o u; states h c, multiplicative intermediate m.

Dimension legend: B batch rows, T timesteps, E embedding (64), H hidden units.

Used by train.py (python train.py --hidden 4096 ...), transfer.py and generate.py; not run directly.
"""
import os
import warnings
import zipfile
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Sizes from the papers: Radford et al. and Puri et al. train 4096 units; Puri et al. also 8192.
PRESETS = {"demo": 256, "small": 1024, "paper": 4096, "large": 8192}
# The released model (README "The released model"): transfer.py's and generate.py's default checkpoint.
RELEASED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "mlstm1024-imdb.pt")


def weight_norm(v, g):
    """w = g * v / ||v||, one norm per output unit (a column of v, which is stored [in, out]).

    The factor g / ||v|| is computed in at least float32 and rounded to fp16 once. (torch's norm of an fp16
    tensor already sums in float32; a hand-written fp16 sum of squares of a 4096-long column would overflow.)
    """
    acc = torch.promote_types(v.dtype, torch.float32)
    scale = g.to(acc) / v.to(acc).norm(dim=0)  # [out]
    return v * scale.to(v.dtype)


def cell(xm, xz, h, c, wh, wmh):
    """One mLSTM step. xm = x W_mx and xz = x W_x + b are precomputed for all timesteps. [B, H] states."""
    # m_t = (W_mx x_t) * (W_mh h_{t-1})      -- the multiplicative, input-dependent transition
    m = xm * (h @ wmh)
    # z_t = W_x x_t + W_h m_t + b
    z = xz + m @ wh  # [B, 4H]
    H = h.shape[1]
    # i, f, o = sigmoid(.)  (one call for the three sigmoid gates);  u = tanh(.)
    # split and chunk, not slices: their backward is one cat, a slice's a zero-filled copy of the whole.
    z_ifo, z_u = z.split([3 * H, H], 1)
    i, f, o = torch.sigmoid(z_ifo).chunk(3, 1)  # [B, H] each
    u = torch.tanh(z_u)
    # c_t = f * c_{t-1} + i * u
    c = f * c + i * u
    # h_t = o * tanh(c_t)
    h = o * torch.tanh(c)
    return h, c


class Recurrence(torch.autograd.Function):
    """The time loop of `cell` with a hand-written backward: MLSTM.rnn's training path.

    Autograd's backward of the loop computes each weight gradient as T GEMMs of only B rows, added up one
    by one (on CPU 1.7x the time of one GEMM over all T*B rows, at H = 256, B = 32), plus the overhead of
    a dozen recorded ops per timestep. Here the reverse loop computes only the data gradients that the
    recurrence needs (dz_t, dm_t, dh_{t-1}, dc_{t-1}); the weight gradients follow as one GEMM each.
    Time-major, so that each step's rows are contiguous: xm [T, B, H], xz [T, B, 4H], h0 c0 [B, H],
    wh [H, 4H], wmh [H, H] -> hs [T, B, H], h_T, c_T [B, H].
    fused=True (train.py --triton) runs each step's gate math as one Triton kernel per direction
    (kernels.py); the plain-torch lines here are the reference that tests/test_kernels.py compares them with.
    """

    @staticmethod
    def forward(ctx, xm, xz, h0, c0, wh, wmh, fused=False):
        T, B, H = xm.shape
        if fused:  # train.py --triton; imported only then, as torch's CPU wheels come without Triton
            import kernels
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
            import kernels
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


def input_products(e, wx, b, wmx):
    """W_mx x_t and W_x x_t + b of every timestep in two large matmuls, outside the time loop:
    e [T, B, E] -> xm [T, B, H], xz [T, B, 4H]."""
    T, B, E = e.shape
    e = e.reshape(T * B, E)  # [T*B, E]
    # + b inside the GEMM (addmm): as a separate add it would read and write the whole [T*B, 4H] window once more
    return (e @ wmx).view(T, B, -1), torch.addmm(b, e, wx).view(T, B, -1)  # [T, B, H], [T, B, 4H]


def recurrence(e, wx, b, wmx, wh, wmh, h0, c0, fused=False):
    """MLSTM.rnn's training path, time-major: e [T, B, E], h0 c0 [B, H] -> hs [T, B, H], h_T, c_T."""
    return Recurrence.apply(*input_products(e, wx, b, wmx), h0, c0, wh, wmh, fused)


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


class MLSTM(nn.Module):
    def __init__(self, hidden=256, embed=64, vocab=256, weight_norm=True):
        super().__init__()
        self.hidden, self.embed_dim, self.vocab, self.use_wn = hidden, embed, vocab, weight_norm
        # train.py --cuda-graph: replay `recurrence` as CUDA graphs, one pair per input shape (see graphed).
        self.cuda_graph, self.graphs = False, {}
        # train.py --triton: Recurrence's gate math as kernels.py's Triton kernels.
        self.triton = False
        # train.py --recompute: segment length for activation checkpointing (see recomputed); 0 is off.
        self.recompute = 0
        H, E = hidden, embed
        self.embed = nn.Embedding(vocab, E)
        # Stored [in, out] as in the reference, so that the products read x @ wx.
        # Uniform(+-1/sqrt(fan_in)) is nn.Linear's default; it keeps z's variance ~1/3 at the start.
        self.wx = nn.Parameter(torch.empty(E, 4 * H).uniform_(-E**-0.5, E**-0.5))
        self.wh = nn.Parameter(torch.empty(H, 4 * H).uniform_(-H**-0.5, H**-0.5))
        self.wmx = nn.Parameter(torch.empty(E, H).uniform_(-E**-0.5, E**-0.5))
        self.wmh = nn.Parameter(torch.empty(H, H).uniform_(-H**-0.5, H**-0.5))
        self.b = nn.Parameter(torch.zeros(4 * H))
        if weight_norm:
            # Gains start at the columns' norms, so w == v at initialisation.
            for name in ("x", "h", "mx", "mh"):
                v = getattr(self, "w" + name)
                self.register_parameter("g" + name, nn.Parameter(v.detach().norm(dim=0).clone()))
        self.out = nn.Linear(H, vocab)

    def weights(self):
        """The effective (wx, wh, wmx, wmh): weight-normalised once per forward, not per timestep."""
        if not self.use_wn:
            return self.wx, self.wh, self.wmx, self.wmh
        return tuple(weight_norm(getattr(self, "w" + n), getattr(self, "g" + n)) for n in ("x", "h", "mx", "mh"))

    def zero_state(self, batch, device=None, dtype=None):
        p = self.wh
        z = torch.zeros(batch, self.hidden, device=device or p.device, dtype=dtype or p.dtype)
        return z, z.clone()

    def rnn(self, x, state=None, return_cells=False):
        """x: byte ids [B, T]. Returns hs [B, T, H], cs [B, T, H] (or None) and the final (h, c)."""
        B = x.shape[0]
        wx, wh, wmx, wmh = self.weights()
        h, c = state if state is not None else self.zero_state(B)
        # Time-major [T, B, .], so that each timestep's rows are contiguous: in batch-major [B, T, .] they
        # lie T*4H elements apart, for powers of two in the same cache sets (15% slower GEMMs at T=64, H=256).
        e = self.embed(x.t())  # [T, B, E]
        if torch.is_grad_enabled() and not return_cells:  # training: the hand-written backward
            args = (e, wx, self.b, wmx, wh, wmh, h, c)
            if self.cuda_graph and e.is_cuda:
                hs, h, c = self.graphed(args)
            elif self.recompute:
                hs, h, c = recomputed(*args, self.recompute, self.triton)
            else:
                hs, h, c = recurrence(*args, self.triton)
            return hs.transpose(0, 1), None, (h, c)  # hs [B, T, H]
        # Inference (or return_cells): the loop of `cell`, under autograd when gradients are on.
        xm, xz = input_products(e, wx, self.b, wmx)  # [T, B, H], [T, B, 4H]
        hs, cs = [], []
        # unbind, not xz[t]: under autograd (return_cells with gradients), a select's backward adds up
        # a full-size [T, B, 4H] gradient (zeros but one slice) per timestep; unbind's is one stack.
        for xm_t, xz_t in zip(xm.unbind(0), xz.unbind(0)):
            h, c = cell(xm_t, xz_t, h, c, wh, wmh)
            hs.append(h)
            if return_cells:
                cs.append(c)
        hs = torch.stack(hs, 1)  # [B, T, H]
        cs = torch.stack(cs, 1) if return_cells else None  # [B, T, H]
        return hs, cs, (h, c)

    def graphed(self, args):
        """recurrence(*args) replayed from two CUDA graphs (its forward and its backward).

        At H = 1024 the loop's ~17 small kernels per timestep take longer to launch from Python than to
        run; a graph launches them all in one call (3.3x faster steps on an H100 at batch 256). Captured on
        first use for each shape (as warm-up steps plus a capture: a few steps' time), then each call copies
        its inputs into the graph's own.
        Its outputs live in the graph's memory, so each forward's backward must run before the next
        forward, as in train.py's loop; state carried between windows is copied in, so it is safe.
        """
        key = tuple((a.shape, a.dtype, a.requires_grad) for a in args) + (self.triton,)
        if key not in self.graphs:
            sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
            with warnings.catch_warnings():
                # torch warms up on one side stream and captures on another, and warns that the sample
                # inputs' gradient nodes changed streams: it inserts a wait, and the replays are tested equal.
                warnings.filterwarnings("ignore", "The AccumulateGrad node's stream does not match")
                self.graphs[key] = torch.cuda.make_graphed_callables(partial(recurrence, fused=self.triton), sample)
        return self.graphs[key](*args)

    def forward(self, x, state=None, return_cells=False):
        """x: byte ids [B, T]. Returns logits [B, T, 256], the final state (h, c), and with
        return_cells=True also the cell state at every step [B, T, H]."""
        hs, cs, state = self.rnn(x, state, return_cells)
        logits = self.out(hs)  # [B, T, 256]
        return (logits, state, cs) if return_cells else (logits, state)


def detach_state(state):
    """Truncated BPTT: the state flows into the next window, its gradient history does not."""
    return tuple(s.detach() for s in state)


def loss_fn(logits, y):
    """Mean cross-entropy in nats, computed in float32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def model_config(cfg):
    """The keyword arguments of MLSTM from a run's config dict (train.py's config.json)."""
    return dict(hidden=cfg["hidden"], embed=cfg["embed"], weight_norm=not cfg["no_weight_norm"])


def read_checkpoint(path, device="cpu"):
    """torch.load(weights_only=True) of a file whose every zip entry passed its CRC-32 check.

    torch.load does not check the CRC-32s of torch.save's zip entries: a flipped bit would load silently
    as a different weight. weights_only: a checkpoint is data, never code to run."""
    try:
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()
    except zipfile.BadZipFile:
        raise ValueError("not torch.save's zip format (a foreign file, or torch's legacy format: torch.load it and "
                         "torch.save it again)") from None
    if damaged:
        raise ValueError(f"CRC-32 mismatch in {damaged}: the file is corrupted")
    return torch.load(path, map_location=device, weights_only=True)


def load_pretrained(path, device="cpu"):
    """(model, config) from a train.py checkpoint or a released model (train.py --export); clear errors
    instead of deep tracebacks. Weights stored in fp16 are loaded into the fp32 model."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such checkpoint file")
    try:
        ckpt = read_checkpoint(path, device)
        model = MLSTM(**model_config(ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # a truncated or corrupted file, a pickle with code in it, another model's weights
        lines = [s.strip() for s in str(e).splitlines() if s.strip()] or [""]
        why = lines[0]  # one line; load_state_dict's first ends in ":" and lists one mismatched weight per line
        if why.endswith(":") and len(lines) > 1:
            why += f" {lines[1]}" + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
        raise SystemExit(f"error: {path}: not a usable mLSTM checkpoint ({type(e).__name__}: {why})")
    bad = [k for k, v in model.state_dict().items() if not v.isfinite().all()]
    if bad:  # a run saved after it diverged: every output would be NaN
        raise SystemExit(f"error: {path}: weights {bad} hold inf or NaN")
    return model.to(device), ckpt["config"]
