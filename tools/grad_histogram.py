"""The gradient range figure of Puri et al. 2018 ("FP16 underflow / loss scaling"): our gradients against fp16.

A few float32 forward/backward steps, then the histogram of log2|gradient| against fp16's range (smallest
subnormal 2^-24, smallest normal 2^-14, max 65504 < 2^16), at scale 1 and times a loss scale S: why
fp16.MixedPrecision multiplies the loss by S before backward.

    python tools/grad_histogram.py --grad-histogram CKPT_OR_CONFIG [--scale 65536] [--data data/reviews.txt.gz] [--steps 4]
    python tools/grad_histogram.py --grad-histogram demo       # fresh weights of a preset
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch

import data
from mlstm import MLSTM, PRESETS, detach_state, loss_fn, model_config
from plumbing import cli
from plumbing.checkpoints import load_pretrained

BINS = 277  # floor(log2|g|) of a nonzero float32 lies in [-149, 127]: bin e + 149


def fp16_fate(g, scale):
    """Of the nonzero float32 values g, how many g * scale cast to fp16 give [all, zero, subnormal, inf]."""
    h = (g * scale).half()
    subnormal = (h != 0) & (h.abs() < 2.0**-14)
    return torch.stack([torch.tensor(g.numel()), (h == 0).sum(), subnormal.sum(), h.isinf().sum()])


def grad_histogram(model, batches, scales):
    """Float32 forward/backward over `batches` of (x, y) (state carried, weights unchanged), summed over steps:
    the histogram of floor(log2|g|) over every nonzero parameter-gradient value ([BINS] counts) and
    fp16_fate of those values at each loss scale ([len(scales), 4] counts)."""
    model.float()
    hist, fates, state = torch.zeros(BINS, dtype=torch.long), torch.zeros(len(scales), 4, dtype=torch.long), None
    for x, y in batches:
        logits, state = model(x, state)
        state = detach_state(state)
        model.zero_grad()
        loss_fn(logits, y).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).abs()
        g = g[g != 0]
        # frexp: g = m * 2^k with m in [0.5, 1), so floor(log2 g) = k - 1, exactly (log2 rounds near powers of 2)
        hist += torch.bincount(torch.frexp(g).exponent.long() + 148, minlength=BINS)
        fates += torch.stack([fp16_fate(g, s) for s in scales])
    return hist, fates


def report(hist, fates, scales, width=40):
    """The text histogram, each bin's fate in fp16 at every scale, and a summary line per scale."""
    nonzero = hist.nonzero().flatten()
    lo, hi, n = int(nonzero[0]), int(nonzero[-1]), int(hist.sum())
    shift = [math.floor(math.log2(s)) for s in scales]
    fate = lambda e: "inf" if e >= 16 else "normal" if e >= -14 else "subnormal" if e >= -25 else "zero"
    print(f"{n} nonzero gradient values; what fp16 makes of each bin at each loss scale:")
    print("log2|g|    share" + "".join(f" {f'x{s:g}':>11}" for s in scales))
    for i in range(lo, hi + 1):
        fates_i = "".join(f" {fate(i - 149 + k):>11}" for k in shift)
        bar = "#" * round(width * int(hist[i]) / int(hist.max()))
        print(f"{i - 149:7d} {100 * int(hist[i]) / n:7.3f}%{fates_i}  {bar}".rstrip())
    for s, k, (total, zero, sub, inf) in zip(scales, shift, fates.tolist()):
        top = hi - 149 + k  # the largest gradient (times s) lies in [2^top, 2^(top+1))
        print(f"x{s:g}: {100 * zero / total:.3f}% round to zero in fp16, {100 * sub / total:.3f}% subnormal, "
              f"{100 * inf / total:.3f}% overflow; largest |g| in [2^{top}, 2^{top + 1}): "
              f"{max(0, 15 - top)} powers of two unused below fp16's max 65504")


def plot(hist, scales, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("(no PNG: matplotlib is not installed)")
    nonzero = hist.nonzero().flatten()
    lo, hi = int(nonzero[0]), int(nonzero[-1])
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.bar(range(lo - 149, hi - 148), (hist[lo : hi + 1] / hist.sum()).tolist(), width=1, align="edge")
    for s, style in zip(scales, ("-", "--", ":")):  # fp16's min subnormal, min normal and max, in units of g
        for e in (-24, -14, 16):
            ax.axvline(e - math.log2(s), ls=style, c="r", label=f"fp16 range at x{s:g}" if e == 16 else None)
    ax.set(xlabel="log2 |gradient|", ylabel="share of values")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def load_model(what):
    """A float32 MLSTM from a train.py checkpoint, a run's config.json (or --out folder), or a preset name."""
    if what in PRESETS:
        torch.manual_seed(1)  # train.py's default seed: the weights a fresh run starts from
        return MLSTM(hidden=PRESETS[what])
    if os.path.isdir(what):
        what = next((f for f in (os.path.join(what, n) for n in ("ckpt.pt", "config.json")) if os.path.isfile(f)), what)
    if not os.path.isfile(what):
        raise SystemExit(f"error: {what}: no such checkpoint or config.json, and not a preset {list(PRESETS)}")
    if not what.endswith(".json"):
        return load_pretrained(what)[0]
    try:
        with open(what) as f:
            cfg = json.load(f)
        torch.manual_seed(cfg["seed"])
        return MLSTM(**model_config(cfg))
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {what}: not a train.py config.json ({type(e).__name__}: {e})")


def main(argv=None):
    p = argparse.ArgumentParser(description="Gradient values against fp16's range (Puri et al. 2018, loss scaling).",
                                formatter_class=cli.Help)
    p.add_argument("--grad-histogram", metavar="CKPT_OR_CONFIG", required=True,
                   help="a train.py ckpt.pt, a run's config.json or --out folder, or a preset name (fresh weights)")
    p.add_argument("--data", default="data/reviews.txt.gz", help="corpus, as for train.py")
    p.add_argument("--cache-dir", default="data/prepared", help="where raw sources are prepared on first use")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="forward/backward steps (windows 0, 1, ...)")
    p.add_argument("--scale", type=float, default=2.0**16, help="a loss scale to compare with 1")
    p.add_argument("--png", default="grad_histogram.png", help="written when matplotlib is installed")
    a = p.parse_args(argv)
    if min(a.batch_size, a.seq_len, a.steps) <= 0 or not 0 < a.scale < math.inf:
        p.error("--batch-size, --seq-len, --steps and --scale must be positive (--scale finite)")
    model = load_model(a.grad_histogram)
    try:
        loader = data.ByteLoader(os.path.join(data.resolve(a.data, a.cache_dir), "train.bin"), a.batch_size, a.seq_len)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    scales = [1.0, a.scale]
    hist, fates = grad_histogram(model, (map(torch.from_numpy, loader.batch(k)) for k in range(a.steps)), scales)
    report(hist, fates, scales)
    plot(hist, scales, a.png)


if __name__ == "__main__":
    cli.main_guard(main)
