"""The byte-level multiplicative LSTM (mLSTM) language model.

Radford et al. 2017 ("Learning to Generate Reviews and Discovering Sentiment", arXiv 1704.01444, section 2),
after Krause et al. 2016, the model that Puri et al. 2018 (arXiv 1808.01371) scale to 40 GB of text:
256 byte ids -> 64-d embedding -> one mLSTM layer of H units -> Linear(H, 256) -> next-byte softmax.
One step, for the embedded byte x_t and the previous state (h_{t-1}, c_{t-1}):

    m_t = (W_mx x_t) * (W_mh h_{t-1})                   the multiplicative, input-dependent transition
    z_t = W_x x_t + W_h m_t + b
    i, f, o = sigmoid(z_t's first three quarters),  u = tanh(its last quarter)
    c_t = f * c_{t-1} + i * u
    h_t = o * tanh(c_t)

with weight normalisation (Salimans & Kingma 2016) on W_x W_h W_mx W_mh, as in the paper. Parameter names
follow the reference model: wx wh wmx wmh (weights), b (bias), gx gh gmx gmh (weight-norm gains).

Dimension legend: B batch rows, T timesteps, E embedding (64), H hidden units.

`cell` is the equations above, and `MLSTM.rnn` runs them over the bytes of a window under autograd: the
reference, and what `python train.py --reference-loop` trains. By default train.py hands the model a faster
time loop of the same equations (fast/loop.py: a hand-written backward, optionally recomputed, replayed as CUDA
graphs, or with Triton kernels), each tested equal to this one (tests/test_fast_loop.py, tests/test_kernels.py).
`sample` writes text with it one byte at a time, optionally holding one unit of the cell state (Radford et al.
section 5: steering with the sentiment neuron). Used by train.py (`python train.py --hidden 4096 ...`),
transfer.py and tools/generate.py; not run directly.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# Sizes from the papers: Radford et al. and Puri et al. train 4096 units; Puri et al. also 8192.
PRESETS = {"demo": 256, "small": 1024, "paper": 4096, "large": 8192}


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


def input_products(e, wx, b, wmx):
    """W_mx x_t and W_x x_t + b of every timestep in two large matmuls, outside the time loop:
    e [T, B, E] -> xm [T, B, H], xz [T, B, 4H]."""
    T, B, E = e.shape
    e = e.reshape(T * B, E)  # [T*B, E]
    # + b inside the GEMM (addmm): as a separate add it would read and write the whole [T*B, 4H] window once more
    return (e @ wmx).view(T, B, -1), torch.addmm(b, e, wx).view(T, B, -1)  # [T, B, H], [T, B, 4H]


class MLSTM(nn.Module):
    def __init__(self, hidden=256, embed=64, vocab=256, weight_norm=True):
        super().__init__()
        self.hidden, self.embed_dim, self.vocab, self.use_wn = hidden, embed, vocab, weight_norm
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

    def rnn(self, x, state=None, return_cells=False, loop=None):
        """x: byte ids [B, T]. Returns hs [B, T, H], cs [B, T, H] (or None) and the final (h, c).
        loop: another implementation of the time loop below (fast/loop.FastLoop, train.py's choice), called as
        loop(e, wx, b, wmx, wh, wmh, h, c) -> hs [T, B, H], h_T, c_T; not with return_cells."""
        B = x.shape[0]
        wx, wh, wmx, wmh = self.weights()
        h, c = state if state is not None else self.zero_state(B)
        # Time-major [T, B, .], so that each timestep's rows are contiguous: in batch-major [B, T, .] they
        # lie T*4H elements apart, for powers of two in the same cache sets (15% slower GEMMs at T=64, H=256).
        e = self.embed(x.t())  # [T, B, E]
        if loop is not None and not return_cells:
            hs, h, c = loop(e, wx, self.b, wmx, wh, wmh, h, c)
            return hs.transpose(0, 1), None, (h, c)  # hs [B, T, H]
        # The reference: the loop of `cell`, under autograd when gradients are on.
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

    def forward(self, x, state=None, return_cells=False, loop=None):
        """x: byte ids [B, T]. Returns logits [B, T, 256], the final state (h, c), and with
        return_cells=True also the cell state at every step [B, T, H]. loop: as in rnn()."""
        hs, cs, state = self.rnn(x, state, return_cells, loop)
        logits = self.out(hs)  # [B, T, 256]
        return (logits, state, cs) if return_cells else (logits, state)


def stepper(model, neuron=None, value=0.0):
    """step(x [B] byte ids, (h, c)) -> (logits [B, 256], (h, c)): one mLSTM step. The weights are
    normalised once here, not per step, and the input side is tabulated for all 256 bytes, so that a
    step is two row lookups and the recurrent products. With `neuron`, c[:, neuron] is held at `value`.
    Call it under torch.inference_mode(), as sample() does."""
    wx, wh, wmx, wmh = model.weights()
    emb = model.embed.weight
    xm, xz = emb @ wmx, emb @ wx + model.b  # [256, H], [256, 4H]

    def step(x, state):
        h, c = cell(xm[x], xz[x], *state, wh, wmh)
        if neuron is not None:
            c[:, neuron] = value  # after this step's update: the next step reads the held value
        return model.out(h), (h, c)
    return step


def pick(logits, temperature, top_k, gen):
    """Next byte ids [B] from logits [B, 256]: argmax at temperature 0, else a draw from the softmax of
    logits / temperature restricted to the top_k most likely bytes (0: all)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # <= 0: a tiny temperature gives -inf, not inf
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]


@torch.inference_mode()
def sample(model, prime, length, temperature=1.0, top_k=0, num_samples=1, seed=0, neuron=None, value=0.0,
           on_bytes=None):
    """`num_samples` texts (bytes: prime + `length` sampled bytes), generated together as one batch.
    on_bytes(ids [B]) sees each step's new bytes as they come. The neuron is held during the prime too."""
    dev = model.wh.device
    step, gen = stepper(model, neuron, value), torch.Generator(device=dev).manual_seed(seed)
    state = model.zero_state(num_samples)
    for b in prime:
        logits, state = step(torch.full((num_samples,), b, device=dev), state)
    out = torch.empty(num_samples, length, dtype=torch.int64, device=dev)
    for t in range(length):
        out[:, t] = x = pick(logits, temperature, top_k, gen)
        if on_bytes:
            on_bytes(x)
        if t + 1 < length:
            logits, state = step(x, state)
    return [prime + bytes(row) for row in out.tolist()]


def detach_state(state):
    """Truncated BPTT: the state flows into the next window, its gradient history does not."""
    return tuple(s.detach() for s in state)


def loss_fn(logits, y):
    """Mean cross-entropy in nats, computed in float32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def model_config(cfg):
    """The keyword arguments of MLSTM from a run's config dict (train.py's config.json)."""
    return dict(hidden=cfg["hidden"], embed=cfg["embed"], weight_norm=not cfg["no_weight_norm"])
