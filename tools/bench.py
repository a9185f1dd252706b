"""Training throughput of the mLSTM step, side by side with the plain eager loop and cuDNN's LSTM.

For one hidden size, batch, sequence length and dtype on one device, up to seven rows:
  ours   the training step exactly as train.py takes it: MLSTM forward from the state carried over from
         the previous window, loss in float32, fp16.MixedPrecision backward and step (fused Adam, clipping at 1).
  graph  ours with train.py --cuda-graph: the recurrent loop's forward and backward replayed as CUDA graphs
         (CUDA only; captured during the warm-up steps).
  triton ours with train.py --triton: each step's gate math as one fused Triton kernel per direction
         (fast/kernels.py; CUDA only). graph-triton: both flags.
  recompute  ours with train.py --recompute S (--recompute here, default 32): activation checkpointing in
         segments of S timesteps, less memory for one more forward of the loop (fast/loop.py).
  plain  the same model written the obvious way: nn.Linear layers under torch's weight-norm
         parametrization (recomputed at every use, so every timestep), a Python loop over time doing
         everything per step. Same math: tests/test_bench.py checks its loss equals ours on the same weights.
  lstm   torch.nn.LSTM of the same hidden size (cuDNN on GPU), the fastest recurrent layer PyTorch ships,
         between the same byte embedding and output layer. It has fewer FLOPs per character (4H^2 against
         the mLSTM's 5H^2 recurrent), so compare it by FLOP rate rather than characters/s. In bf16, torch
         runs it on cuDNN only from cuDNN 9.13 (the header prints the version), else on its own per-step cells.
All take the same MixedPrecision step with fused Adam; only the model differs. Per row: step time (median of
--steps timed steps after --warmup-steps, the device synchronised before and after each), characters/s
(B*T / step time), model FLOPs per character from the layer sizes (flops_per_char), achieved TFLOP/s, MFU
against the device's dense peak for the dtype (PEAKS by GPU name, or --peak-tflops; n/a on CPU without it),
peak memory, fp16 steps skipped on overflow (a skipped step is faster), and ours/row ratios.

Reference, Puri et al. 2018 (arXiv 1808.01371): V100s trained the 4096-d mLSTM at about 81k characters/s
per GPU (0.81 s per 256x256-character iteration), ~0.5 GFLOP per character for training
(flops_per_char("ours", 4096) = 0.52e9), so ~42 TFLOP/s: a third of the V100's 125 TFLOP/s fp16 peak.

    python tools/bench.py                                          # the demo: hidden 256, batch 32, seq 64, fp32, CPU
    python tools/bench.py --hidden paper --batch-size 256 --seq-len 256 --dtype fp16 --device cuda
    python tools/bench.py --hidden 4096 --batch-size 512 --seq-len 256 --dtype bf16 --only ours,lstm --json out/bench.json
    python tools/bench.py --hidden 4096 --batch-size 512 --seq-len 256 --dtype fp16 --device cuda --only ours,triton,graph-triton
"""
import argparse
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch
import torch.nn as nn

import distributed
import fp16
from fast.loop import FastLoop
from mlstm import MLSTM, PRESETS, detach_state, loss_fn
from plumbing import cli

KINDS = ("ours", "graph", "triton", "graph-triton", "recompute", "plain", "lstm")
CUDA_ONLY = ("graph", "triton", "graph-triton")

# Dense (no sparsity) peak TFLOP/s per dtype from the vendors' datasheets. The first name found in
# torch.cuda.get_device_name() wins, so the PCIe/NVL variants come before the plain "H100"/"H200"/"V100" (SXM).
# fp32 is the CUDA-core rate; tf32 is used for fp32 rows whose matmuls are allowed to run in TF32.
HOPPER_SXM = {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67}
HOPPER_NVL = {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}
PEAKS = [
    ("H100 PCIe", {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),
    ("H100 NVL", HOPPER_NVL),
    ("H100", HOPPER_SXM),
    ("H200 NVL", HOPPER_NVL),
    ("H200", HOPPER_SXM),  # also GH200: the H100 SXM's compute, more and faster memory
    ("A100", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    ("V100S", {"fp16": 130, "fp32": 16.4}),  # no bf16 or tf32 tensor cores on any V100
    ("V100-PCIE", {"fp16": 112, "fp32": 14}),
    ("V100", {"fp16": 125, "fp32": 15.7}),
]


def flops_per_char(kind, hidden, embed=64, vocab=256):
    """Model FLOPs per character of a training step, from the layer sizes.

    A matmul [m, k] @ [k, n] is 2*m*n*k FLOPs forward; its backward is two more of the same size (the
    input's and the weight's gradient), so x3 for forward + backward: 6 FLOPs per multiply-add per byte.
    Multiply-adds per byte:  mLSTM: input projections E*(4H + H), recurrent H*4H + H*H, output H*V;
                             LSTM:  input E*4H, recurrent H*4H, output H*V.
    Not counted (as usual for MFU): elementwise gate math, weight norm, softmax, embedding, optimizer.
    """
    E, H, V = embed, hidden, vocab
    if kind == "lstm":
        return 6 * (E * 4 * H + H * 4 * H + H * V)
    return 6 * (E * (4 * H + H) + H * 4 * H + H * H + H * V)


class PlainMLSTM(nn.Module):
    """The mLSTM of mlstm.py written the obvious way, everything per timestep (gates i, f, o, u)."""

    def __init__(self, hidden, embed=64, vocab=256):
        super().__init__()
        H, E = hidden, embed
        wn = nn.utils.parametrizations.weight_norm  # w = g * v / ||v|| per output unit, at every use
        self.embed = nn.Embedding(vocab, E)
        self.wx = wn(nn.Linear(E, 4 * H))  # its bias is the cell's b
        self.wh = wn(nn.Linear(H, 4 * H, bias=False))
        self.wmx = wn(nn.Linear(E, H, bias=False))
        self.wmh = wn(nn.Linear(H, H, bias=False))
        self.out = nn.Linear(H, vocab)

    def forward(self, x, state):
        h, c = state
        logits = []
        for t in range(x.shape[1]):
            e = self.embed(x[:, t])
            m = self.wmx(e) * self.wmh(h)
            i, f, o, u = (self.wx(e) + self.wh(m)).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
            h = torch.sigmoid(o) * torch.tanh(c)
            logits.append(self.out(h))
        return torch.stack(logits, 1), (h, c)

    @torch.no_grad()
    def load_mlstm(self, model):
        """Copy a weight-normed MLSTM's weights: v stored [in, out] there, [out, in] in nn.Linear."""
        self.embed.weight.copy_(model.embed.weight)
        for n in ("x", "h", "mx", "mh"):
            wn = getattr(self, "w" + n).parametrizations.weight
            wn.original0.copy_(getattr(model, "g" + n).view(-1, 1))  # g [out, 1]
            wn.original1.copy_(getattr(model, "w" + n).t())  # v [out, in]
        self.wx.bias.copy_(model.b)
        self.out.load_state_dict(model.out.state_dict())
        return self


class LSTMLM(nn.Module):
    """torch.nn.LSTM between a byte embedding and an output layer; state (h, c) of shape [1, B, H]."""

    def __init__(self, hidden, embed=64, vocab=256):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x, state):
        hs, state = self.lstm(self.embed(x), state)  # [B, T, H]
        return self.out(hs), state


def plain_like_ours(hidden):
    """The plain loop on the weights that ours starts from under the same seed (MLSTM is drawn first)."""
    ours = MLSTM(hidden)
    return PlainMLSTM(hidden).load_mlstm(ours)


MODELS = {"ours": MLSTM, "graph": MLSTM, "triton": MLSTM, "graph-triton": MLSTM, "recompute": MLSTM,
          "plain": plain_like_ours, "lstm": LSTMLM}  # by hidden size


def loop_of(kind, segment):
    """The time loop train.py would run for the row `kind` (fast/loop.FastLoop), None for the other models."""
    flags = {"ours": {}, "graph": dict(cuda_graph=True), "triton": dict(triton=True),
             "graph-triton": dict(cuda_graph=True, triton=True), "recompute": dict(recompute=segment)}
    return FastLoop(**flags[kind]) if kind in flags else None


def train_step(model, mp, opt, x, y, state, loop=None):
    """train.py's step (its single-process all-reduce is a no-op): returns the next window's state."""
    logits, state = model(x, state, loop=loop) if loop else model(x, state)
    state = detach_state(state)
    mp.backward(loss_fn(logits, y))
    mp.step(opt, clip=1.0)
    return state


def peak_tflops(device, dtype, tf32):
    """The PEAKS entry for this GPU and dtype (tf32: fp32 matmuls may use TF32), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((p for key, p in PEAKS if key in name), {})
    return peaks.get("tf32" if dtype == "fp32" and tf32 else dtype, peaks.get(dtype))


def max_rss_mib():
    """This process's peak resident memory so far; None without the `resource` module (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 2**20 if sys.platform == "darwin" else kib / 2**10


def measure(kind, hidden, batch, seq_len, dtype="fp32", device="cpu", steps=10, warmup=3, peak=None, seed=0,
            segment=32):
    """One row of the table, as a dict; numbers None and `error` set when the device ran out of memory."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    row = dict(kind=kind, flops_per_char=flops_per_char(kind, hidden), ms_per_step=None, chars_per_s=None,
               tflops=None, mfu=None, peak_tflops=None, peak_mem_mib=None, skipped=None, error=None,
               mem="cuda max allocated" if cuda else "growth of the process's peak RSS, order-dependent: one-time "
               "library loading falls on the first row, a row smaller than an earlier one shows ~0; use --only")
    if cuda:  # `peak` reads TF32 permission: torch's matmul flag for ours/plain, cuDNN's for the LSTM
        tf32 = torch.backends.cudnn.allow_tf32 if kind == "lstm" else torch.backends.cuda.matmul.allow_tf32
        peak = peak or peak_tflops(device, dtype, tf32)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = max_rss_mib()
    try:
        torch.manual_seed(seed)
        model, loop = MODELS[kind](hidden).to(device), loop_of(kind, segment)
        mp = fp16.MixedPrecision(model, dtype)
        if kind == "lstm":  # the dtype conversion left cuDNN's weights in pieces: one buffer again, not a copy per call
            model.lstm.flatten_parameters()  # (torch skips this for bf16, then warns and compacts in every call)
        opt = mp.optimizer(1e-4)
        x, y = torch.randint(0, 256, (2, batch, seq_len), device=device)
        shape = (1, batch, hidden) if kind == "lstm" else (batch, hidden)
        state = tuple(torch.zeros(shape, device=device, dtype=fp16.DTYPES[dtype]) for _ in "hc")
        times = []
        for k in range(warmup + steps):
            if k == warmup:  # fp16 overflows of the warm-up steps are not the timed steps'
                skipped0 = int(mp.skipped)
            sync()
            t0 = time.perf_counter()
            state = train_step(model, mp, opt, x, y, state, loop)
            sync()
            if k >= warmup:
                times.append(time.perf_counter() - t0)
        skipped = int(mp.skipped) - skipped0
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not cli.out_of_memory(e):
            raise
        row["error"] = "out of memory"
        return row  # the failed step's tensors go with this frame; the next row's empty_cache frees them
    s = statistics.median(times)
    row.update(ms_per_step=1e3 * s, chars_per_s=batch * seq_len / s, skipped=skipped)
    row["tflops"] = row["flops_per_char"] * row["chars_per_s"] / 1e12
    row["mfu"], row["peak_tflops"] = (row["tflops"] / peak, peak) if peak else (None, None)
    row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else (
        max_rss_mib() - rss0 if rss0 is not None else None)
    return row


def add_ratios(rows):
    """ours/row for characters/s and for FLOP/s, where both rows have numbers."""
    ours = next((r for r in rows if r["kind"] == "ours" and r["chars_per_s"]), None)
    for r in rows:
        ok = ours is not None and r["chars_per_s"] is not None
        r["ours_over_row_chars"] = ours["chars_per_s"] / r["chars_per_s"] if ok else None
        r["ours_over_row_flops"] = ours["tflops"] / r["tflops"] if ok else None
    return rows


def table(rows):
    cols = [("row", "kind", "{}"), ("ms/step", "ms_per_step", "{:.1f}"), ("chars/s", "chars_per_s", "{:,.0f}"),
            ("GFLOP/char", "flops_per_char", "{:.4g}"), ("TFLOP/s", "tflops", "{:.3g}"), ("MFU", "mfu", "{:.1%}"),
            ("peak MiB", "peak_mem_mib", "{:,.0f}"), ("skipped", "skipped", "{}"),
            ("ours/row chars/s", "ours_over_row_chars", "{:.2f}"), ("ours/row FLOP/s", "ours_over_row_flops", "{:.2f}")]
    scale = {"flops_per_char": 1e-9}
    cells = [[name for name, _, _ in cols]] + [
        [fmt.format(r[key] * scale.get(key, 1)) if r[key] is not None else "-" if r["error"] else "n/a"
         for _, key, fmt in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def main(a):
    device = distributed.pinned(a.device)
    if device.type == "cuda":  # Triton kernels and CUDA graphs run on the current device: make it this one
        torch.cuda.set_device(device)
    name = (f"{torch.cuda.get_device_name(device)}, cuDNN {torch.backends.cudnn.version()}" if device.type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads")
    if any("triton" in k for k in a.only):
        import triton
        name += f", Triton {triton.__version__}"
    config = dict(hidden=a.hidden, batch_size=a.batch_size, seq_len=a.seq_len, dtype=a.dtype, steps=a.steps,
                  warmup_steps=a.warmup_steps, recompute=a.recompute, peak_tflops=a.peak_tflops, device=name,
                  torch=torch.__version__)
    print(f"{name} | torch {torch.__version__} | hidden {a.hidden}, batch {a.batch_size}, seq {a.seq_len}, {a.dtype} | "
          f"median of {a.steps} steps after {a.warmup_steps} warm-up", flush=True)
    rows = add_ratios([measure(k, a.hidden, a.batch_size, a.seq_len, a.dtype, device, a.steps, a.warmup_steps,
                               a.peak_tflops, segment=a.recompute) for k in a.only])
    print(table(rows))
    peaks = ", ".join(f"{r['kind']} {r['peak_tflops']:g}" for r in rows if r["peak_tflops"])
    print(f"peak MiB: {rows[0]['mem']}" + (f"; MFU of peak TFLOP/s: {peaks}" if peaks else "") +
          "".join(f"; {r['kind']}: {r['error']}" for r in rows if r["error"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": config, "rows": rows}, f, indent=1)
        print(f"wrote {a.json}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Training throughput and MFU: our mLSTM step vs the plain loop and "
                                "nn.LSTM.", formatter_class=cli.Help)
    p.add_argument("--hidden", default="demo", help=f"mLSTM units: an integer or a preset {PRESETS}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dtype", choices=list(fp16.DTYPES), default="fp32")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--recompute", type=int, default=32, metavar="S", help="the recompute row's segment (timesteps)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (allocator, cuDNN plans)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense peak for --dtype (None: PEAKS by GPU name)")
    p.add_argument("--only", help="comma-separated rows, from " + ",".join(KINDS) + " (default: all; " +
                   ",".join(CUDA_ONLY) + " on CUDA, the triton ones where Triton is installed)")
    p.add_argument("--json", metavar="OUT", help="also write the config and rows here")
    a = p.parse_args(argv)
    a.hidden = PRESETS.get(a.hidden) or (int(a.hidden) if a.hidden.isdigit() else p.error(
        f"--hidden must be an integer or one of {list(PRESETS)}"))
    for name in ("hidden", "batch_size", "seq_len", "recompute", "steps"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    if a.peak_tflops is not None and not 0 < a.peak_tflops < math.inf:
        p.error("--peak-tflops must be positive")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if why := cli.device_problem(a.device):
        p.error(why)
    device = torch.device(a.device)
    if a.json:  # now, not after the whole table has been measured
        try:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        except OSError as e:
            p.error(f"--json {a.json}: cannot create its folder ({e.strerror})")
        if os.path.isdir(a.json) or not os.access(os.path.dirname(os.path.abspath(a.json)), os.W_OK):
            p.error(f"--json {a.json}: not a file name in a writable folder")
    has_triton = importlib.util.find_spec("triton") is not None
    a.only = a.only.split(",") if a.only else [k for k in KINDS if (k not in CUDA_ONLY or device.type == "cuda")
                                               and ("triton" not in k or has_triton)]
    if not set(a.only) <= set(KINDS) or len(set(a.only)) != len(a.only):
        p.error(f"--only takes distinct names from {','.join(KINDS)}, got {','.join(a.only)}")
    fast = [k for k in a.only if k in CUDA_ONLY]
    if fast and device.type != "cuda":
        p.error(f"--only {','.join(fast)}: CUDA graphs and Triton kernels need --device cuda")
    if any("triton" in k for k in a.only) and not has_triton:
        p.error("--only ...triton: needs the triton package (torch's CUDA wheels install it)")
    return a


if __name__ == "__main__":
    args = parse_args()
    cli.main_guard(lambda: main(args))
