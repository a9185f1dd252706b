"""Reading text for features without gradients (transfer.featurize, so also classify.py and finetune.py's
evaluation), made fast, tested equal to transfer.features of mlstm.py's own loop (tests/test_transfer.py):

- `schedule` and `pooled_states`: a batch of rows, each reading its own text from a zero state and refilled with
  the next text as its own ends (longest first), so that the matrix products stay as tall as the batch and no
  padding is read; only the pools' running values are kept, never a [B, T, H] sequence of states;
- `step`: mlstm.cell's equations with fewer passes over memory;
- `settings`: the precision and batch that suit the machine.

On a CPU the two recurrent matrix products of a step are fast in bf16 where the CPU has bf16 matrix units
(Intel AMX, AVX-512 BF16: ~5x fp32's rate on 2 cores of a Xeon); the gate math around them is not, and in bf16
torch's tanh is 4x slower than in float32. So the step runs the products in the model's dtype and the gate math
in float32, with the cell state kept in float32 (also the more accurate):

    python transfer.py --task sst2 --data-dir ../shared/data/sst2          # dtype and batch chosen here
    python tools/bench.py --featurize                                      # bytes/s against the products alone
"""
import heapq

import numpy as np
import torch


def step(xm_all, xz_all, ids, h, c, wh, wmh):
    """One step of mlstm.cell for byte ids [B] from the input products of all 256 bytes (xm_all = E W_mx [256, H],
    xz_all = E W_x + b [256, 4H]): h [B, H] in the model's dtype, c [B, H] float32 -> (h, c)."""
    H = h.shape[1]
    # m_t = (W_mx x_t) * (W_mh h_{t-1}): a row gather (index_select: 4x faster than x[ids]), multiplied in place
    m = torch.index_select(xm_all, 0, ids).mul_(h @ wmh)
    # z_t = W_x x_t + b + W_h m_t: the gathered rows are the GEMM's addend, not another pass; then float32
    z = torch.addmm(torch.index_select(xz_all, 0, ids), m, wh).float()  # [B, 4H]
    z[:, : 3 * H].sigmoid_()  # i, f, o
    z[:, 3 * H :].tanh_()  # u
    i, f, o, u = z.chunk(4, 1)  # [B, H] views
    # c_t = f * c_{t-1} + i * u;  h_t = o * tanh(c_t), both written into z's own buffers
    c = f.mul_(c).addcmul_(i, u)
    return o.mul_(torch.tanh(c)).to(h.dtype), c


def schedule(lengths, rows):
    """How `rows` rows read texts of `lengths` bytes one after another: longest first, each to the row free
    soonest. -> (rows used, row and first step of each text; -1 for an empty text), the rows numbered by how
    long they read (row 0 the longest), so that the rows still reading at any step are a prefix."""
    order = [int(i) for i in np.argsort(-lengths, kind="stable") if lengths[i] > 0]
    rows = min(rows, len(order))
    free = [(0, r) for r in range(rows)]  # (the step a row is free from, the row): a heap
    row, first = np.full(len(lengths), -1), np.zeros(len(lengths), dtype=np.int64)
    for i in order:
        first[i], row[i] = heapq.heappop(free)
        heapq.heappush(free, (first[i] + int(lengths[i]), row[i]))
    ends = np.zeros(rows, dtype=np.int64)
    ends[[r for _, r in free]] = [t for t, _ in free]
    rank = np.empty(rows, dtype=np.int64)
    rank[np.argsort(-ends, kind="stable")] = np.arange(rows)
    row[row >= 0] = rank[row[row >= 0]]
    return rows, row, first


@torch.inference_mode()
def pooled_states(model, byte_strings, pools, batch_size, progress=None):
    """{(state, how): [N, H] float32 tensor}: for each (state "h" or "c", pool "last" "mean" or "max") of `pools`,
    that pool of each text's states (transfer.pool's definition; an empty text: zeros), computed as the model
    reads: each step updates a running sum and max. batch_size rows read at once, as `schedule` assigns them."""
    dev, H, N = model.wh.device, model.hidden, len(byte_strings)
    lengths = np.array([len(b) for b in byte_strings], dtype=np.int64)
    rows, row, first = schedule(lengths, batch_size)
    last = first + lengths - 1  # the step of each text's last byte
    steps = int(last.max(initial=-1)) + 1
    ids = np.zeros((steps, rows), dtype=np.uint8)  # the byte each row reads at each step
    for i in np.flatnonzero(row >= 0):
        ids[first[i] : last[i] + 1, row[i]] = np.frombuffer(byte_strings[i], dtype=np.uint8)
    totals = np.sort(np.bincount(row[row >= 0], weights=lengths[row >= 0], minlength=rows))  # each row's steps
    reading = rows - np.searchsorted(totals, np.arange(steps), side="right")  # the rows still reading at step t
    done = np.flatnonzero(row >= 0)[np.argsort(last[row >= 0], kind="stable")]  # texts by the step they end
    at = np.searchsorted(last[done], np.arange(steps + 1))  # done[at[t]:at[t + 1]] end at step t
    who, where = torch.from_numpy(done).to(dev), torch.from_numpy(row[done]).to(dev)
    n = torch.from_numpy(lengths[done]).to(dev, torch.float32)[:, None]

    wx, wh, wmx, wmh = model.weights()
    emb = model.embed.weight
    # The input side of all 256 bytes, once: a step reads two rows of these instead of two products.
    xm_all, xz_all = emb @ wmx, torch.addmm(model.b, emb, wx)  # [256, H], [256, 4H]
    h, c = torch.zeros(rows, H, device=dev, dtype=wh.dtype), torch.zeros(rows, H, device=dev)  # c in float32
    # running sums and maxima in float32 whatever the model's dtype (a bf16 sum of a thousand steps loses digits)
    acc = {sp: torch.full((rows, H), -torch.inf if sp[1] == "max" else 0.0, device=dev) for sp in pools
           if sp[1] != "last"}
    out = {sp: torch.zeros(N, H, device=dev) for sp in pools}
    told = 0
    for t in range(steps):
        a = int(reading[t])
        x = torch.from_numpy(ids[t, :a]).to(dev, torch.int64)
        h, c = step(xm_all, xz_all, x, h[:a], c[:a], wh, wmh)
        states = {"c": c, "h": h.float() if any(s == "h" for s, _ in pools) else None}
        for (state, how), buf in acc.items():
            if how == "mean":
                buf[:a] += states[state]
            else:
                torch.maximum(buf[:a], states[state], out=buf[:a])
        if at[t + 1] == at[t]:
            continue
        k = slice(at[t], at[t + 1])  # the texts that end now, and their rows
        for state, how in pools:  # their features; then the rows start afresh (zero state, empty pools)
            v = (states[state] if how == "last" else acc[state, how]).index_select(0, where[k])
            out[state, how].index_copy_(0, who[k], v / n[k] if how == "mean" else v)
        for buf in (h, c, *(acc[sp] for sp in acc if sp[1] == "mean")):
            buf.index_fill_(0, where[k], 0.0)
        for sp in (sp for sp in acc if sp[1] == "max"):
            acc[sp].index_fill_(0, where[k], -torch.inf)
        if progress and (at[t + 1] - told >= batch_size or t == steps - 1):
            told = at[t + 1]
            progress(told, int(lengths[done[:told]].sum()), final=t == steps - 1)
    return out


def bf16_matrix_units():
    """The CPU's bf16 matrix instructions (AMX, AVX-512 BF16) that make bf16 products fast, from /proc/cpuinfo
    (Linux); [] where there are none or it cannot tell."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16")) if flag in flags]


def settings(device, dtype=None, batch_size=None, model_dtype="fp32"):
    """(dtype, batch_size, why): what featurize runs with on `device` where they are not given. A GPU: the
    model's training precision `model_dtype`, batch 256. A CPU: bf16 at batch 256 where it has bf16 matrix
    units, else fp32 at batch 128 (the fastest in tools/bench.py --featurize: BENCHMARKS.md)."""
    cpu = torch.device(device).type == "cpu"
    if dtype:
        why = "as given"
    elif not cpu:
        dtype, why = model_dtype, "the model's training precision, on a GPU"
    elif units := bf16_matrix_units():
        dtype, why = "bf16", f"this CPU has bf16 matrix units: {', '.join(units)}"
    else:
        dtype, why = "fp32", "this CPU has no bf16 matrix units"
    batch = batch_size or (128 if cpu and dtype == "fp32" else 256)
    return dtype, batch, f"{dtype} ({why}), batch {batch}" + ("" if batch_size else " (its default)")
