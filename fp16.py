"""Mixed-precision training by hand: FP32 master weights, dynamic loss scaling, FP32 loss.

Puri et al. 2018 (arXiv 1808.01371), "Scaling training - Volta tensor cores" and "FP16 underflow /
Loss scaling" (after Micikevicius et al. 2017): the model computes in half precision on tensor cores,
the optimizer updates a float32 master copy of every weight, the loss is multiplied by a scale S
so that small gradients do not flush to zero in fp16, and steps whose gradients overflow are skipped
while S is halved. Also bf16: float32's range in 16 bits, so masters but no scaling. The overflow check,
the skip and the change of S are tensor ops on the GPU, so that the host need not wait for it in a step.

    python train.py --dtype fp16 [--loss-scale 65536] [--static-loss-scale] [--scale-growth 1000]
    python train.py --dtype bf16

The gradient range tool: a few float32 forward/backward steps, then the histogram of log2|gradient| against
fp16's range (smallest subnormal 2^-24, smallest normal 2^-14, max 65504 < 2^16), at scale 1 and times S:

    python fp16.py --grad-histogram CKPT_OR_CONFIG [--scale 65536] [--data data/reviews.txt.gz] [--steps 4]
"""
import argparse
import json
import math
import os

import torch

import data
from mlstm import MLSTM, PRESETS, detach_state, load_pretrained, loss_fn, model_config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class MixedPrecision:
    """Wraps a float32 model: converts it to `dtype` for compute and keeps float32 masters.

    Each step: backward(loss) scales the loss; step(optimizer) unscales the gradients into the master
    gradients, checks them all at once for inf/NaN (through their global norm), clips them, and steps the
    optimizer (built over .masters), or skips the step on overflow and halves S; then it copies the masters
    back into the compute model.
    For fp32 the masters are the model's own parameters and S = 1: the same loop, no copies.

    The scale, the count of good steps since S last changed and the count of skipped steps are tensors on
    the model's device, updated by tensor ops: with an optimizer that skips on the device (fused Adam, as
    train.py builds it), a step need not wait for the GPU. Read them with float()/int() when logging.
    """

    def __init__(self, model, dtype="fp32", init_scale=2.0**16, growth_interval=1000, dynamic=True):
        self.dtype = dtype
        self.names = [n for n, _ in model.named_parameters()]
        self.params = list(model.parameters())
        if dtype == "fp32":
            self.masters = self.params
        else:
            self.masters = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
            model.to(DTYPES[dtype])  # converts in place: self.params now hold the half-precision copy
        self.scaling = dtype == "fp16"  # bf16 has float32's exponent range: nothing to rescue
        device = self.params[0].device
        self.scale = torch.tensor(float(init_scale) if self.scaling else 1.0, device=device)
        self.dynamic, self.growth_interval = dynamic, growth_interval
        self.good_steps = torch.zeros((), dtype=torch.long, device=device)  # since the last change of S
        self.skipped = torch.zeros((), dtype=torch.long, device=device)

    def optimizer(self, lr):
        """Adam over the masters, fused: one kernel for all tensors, and it skips on a device-side flag."""
        return torch.optim.Adam(self.masters, lr=torch.tensor(float(lr), device=self.scale.device), fused=True)

    def backward(self, loss):
        """Backward of loss * S; the loss is a float32 scalar (the softmax ran in float32)."""
        (loss.float() * self.scale).backward()

    @torch.no_grad()
    def step(self, optimizer, clip=0.0, reduce_grads=None):
        """One optimizer step, or a skip on overflow. reduce_grads(params), when given, all-reduces
        the compute gradients first, so every rank sees the same inf/NaN and skips the same steps.
        Returns (grad_norm of the unscaled gradients before clipping, whether the step was taken), both
        tensors on the device."""
        for p in self.params:
            if p.grad is None:  # a parameter that got no gradient still takes part in the reduction
                p.grad = torch.zeros_like(p)
        if reduce_grads is not None:
            reduce_grads(self.params)
        if self.masters is not self.params:
            for m, p in zip(self.masters, self.params):
                m.grad = p.grad.float()
        grads = [m.grad for m in self.masters]
        if self.scaling:
            torch._foreach_mul_(grads, self.scale.reciprocal())  # exact for a power-of-two S (the default); else within 1 ulp
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        # The one check of all gradients: an inf or NaN anywhere makes the global norm non-finite.
        found_inf = (~torch.isfinite(norm)).float()
        if clip > 0:
            torch._foreach_mul_(grads, torch.clamp(clip / (norm + 1e-6), max=1.0))
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # torch.amp's protocol: a fused optimizer reads found_inf on the device and leaves every
            # weight, moment and step count as it was when it is 1. No host sync.
            optimizer.found_inf = found_inf
            optimizer.step()
            del optimizer.found_inf
        elif not found_inf.item():  # any other optimizer: the host decides, which waits for the GPU
            optimizer.step()
        if self.masters is not self.params:
            torch._foreach_copy_([p.data for p in self.params], [m.data for m in self.masters])
        self.zero_grad()
        self.update_scale(found_inf.bool())
        return norm, found_inf == 0

    def update_scale(self, overflow):
        """Count the step; on overflow halve S (floor 1), after growth_interval good steps in a row double it."""
        self.skipped += overflow
        self.good_steps.copy_(torch.where(overflow, 0, self.good_steps + 1))
        if self.scaling and self.dynamic:
            grow = self.good_steps == self.growth_interval
            self.scale.copy_(torch.where(overflow, (self.scale / 2).clamp(min=1.0),
                                         torch.where(grow, self.scale * 2, self.scale)))
            self.good_steps.masked_fill_(grow, 0)

    def zero_grad(self):
        for p in self.params + (self.masters if self.masters is not self.params else []):
            p.grad = None

    def master_state_dict(self):
        """The float32 weights under the model's parameter names: what a checkpoint stores."""
        return {n: m.detach().float() for n, m in zip(self.names, self.masters)}

    def state_dict(self):
        return {"scale": self.scale.item(), "good_steps": self.good_steps.item(), "skipped": self.skipped.item()}

    def load_state_dict(self, sd):
        self.scale.fill_(float(sd["scale"]))
        self.good_steps.fill_(int(sd["good_steps"]))
        self.skipped.fill_(int(sd["skipped"]))


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
    print(f"log2|g|    share" + "".join(f" {f'x{s:g}':>11}" for s in scales))
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
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    main()
