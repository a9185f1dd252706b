"""A training run's folder (--out) and what train.py's loop reports into it.

The folder is created and locked by the main process for the run's life (a second run into it is refused);
it holds config.json, metrics.jsonl (one JSON object per log or evaluation event) and the checkpoints. Every
--log-every steps the loop prints one line with fixed fields, the loss all-reduced over the processes:

    step 1000/1500 | loss 1.546 | bpc 2.230 | lr 6.68e-04 | scale 1 | skipped 0 | 65 ms | 0.0315M chars/s | eta 0m58s

and stops the run as diverged when the loss is not finite or absurd, or fp16's loss scale has nothing left
to rescue. The ms and chars/s leave out evaluations and checkpoints.
"""
import contextlib
import itertools
import json
import math
import os
import time

import torch

import distributed
from plumbing.folders import locked
from plumbing.sources import DataError

# A mean loss above this (nats per byte; 10x a uniform guess over 256 bytes, 80 bits per byte) is divergence
# even when finite: a too-high learning rate sends the loss to millions, not to inf.
DIVERGED_LOSS = 10 * math.log(256)


@contextlib.contextmanager
def claimed(out, main, log):
    """--out for the with-block: created, checked writable and locked by the main process (the others wait)."""
    if not main:
        yield
        return
    made = not os.path.exists(out)  # and so removed again if the run leaves nothing in it (a refused start)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out {out}: {e}")
    if not os.access(out, os.W_OK):
        raise SystemExit(f"error: cannot write to --out {out}: permission denied")
    # Held while this run writes --out: a second run into it would interleave the logs and rotate away the
    # checkpoints. Windows has no such lock.
    busy = f"another run is using --out {out} (it holds .lock there); wait for it to end or give another --out"
    try:
        with locked(os.path.join(out, ".lock"), log, busy):
            yield
    except DataError as e:  # the lock's (train.py turns its own data errors into messages)
        raise SystemExit(f"error: {e}")
    finally:
        if made and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)


def start_run_files(cfg, start, log):
    """Write config.json, and cut metrics.jsonl back to the events up to step `start` (the checkpoint resumed
    from; 0 for a fresh run), so that a resumed run does not log the steps after its checkpoint twice."""
    out, path = cfg["out"], os.path.join(cfg["out"], "metrics.jsonl")
    kept = []
    if start == 0 and any(os.path.exists(os.path.join(out, f)) for f in ("ckpt.pt", "metrics.jsonl")):
        log(f"warning: {out} holds an earlier run; this fresh run replaces its log and keeps its checkpoints, if "
            "any, as *.earlier (*.earlier2, ... if taken; to continue a run, give --resume)")
    try:
        names = ("ckpt.pt", "ckpt.prev.pt") if start == 0 else ()  # never resumed, nor fallen back to, later
        tags = (".earlier" + (str(k) if k > 1 else "") for k in itertools.count(1))  # a still earlier run's: kept
        tag = next(t for t in tags if not any(os.path.exists(os.path.join(out, n + t)) for n in names))
        for name in names:
            if os.path.exists(os.path.join(out, name)):
                os.replace(os.path.join(out, name), os.path.join(out, name + tag))
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by a kill
                        if json.loads(line)["step"] <= start:
                            kept.append(line)
        for name, text in (("config.json", json.dumps(cfg, indent=1)), ("metrics.jsonl", "".join(kept))):
            with open(os.path.join(out, name + ".tmp"), "w") as f:
                f.write(text)
            os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out {out} ({type(e).__name__}: {e})")


def append_metrics(out, event):
    """One event as one JSON line of OUT/metrics.jsonl (train.py's run log, finetune.py's)."""
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(event) + "\n")


def duration(seconds):
    h, m, s = int(seconds // 3600), int(seconds % 3600 // 60), int(seconds % 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class RunLog:
    """The loop's reports: add(loss) every step, report() at log steps, heldout() for evaluations, paused()
    around what the speed leaves out, saved() after each checkpoint (the error messages name the last one)."""

    def __init__(self, cfg, d, mp, step, total, end, log, resumed):
        self.cfg, self.d, self.mp, self.total, self.end, self.log = cfg, d, mp, total, end, log
        self.loss_sum, self.n = torch.zeros((), device=d.device), 0
        self.t0 = self.t_start = time.time()
        self.step_start, self.skipped_before = step, mp.state_dict()["skipped"]
        self.last_ok = step if resumed else None

    def add(self, loss):
        self.loss_sum += loss.detach()  # on the device: no wait for the GPU until report()
        self.n += 1

    def report(self, step, lr, grad_norm):
        """The log line and its metrics.jsonl event for the steps since the last one; SystemExit on divergence."""
        cfg, sc = self.cfg, self.mp.state_dict()  # the loss scale and counts, read back from the device here only
        mean = distributed.all_reduce_mean(self.loss_sum / self.n).item()
        # a loss gone absurd, or overflow skips that loss scaling cannot rescue (fp16.MixedPrecision.stuck)
        if not mean < DIVERGED_LOSS or self.mp.stuck(sc, self.skipped_before, self.n):
            raise SystemExit(f"error: training diverged at step {step} (loss {mean}, {sc['skipped']} skipped "
                             f"steps, loss scale {sc['scale']:g}); {self.last_good()}. Lower --lr or raise --warmup.")
        dt = time.time() - self.t0
        cps = self.n * cfg["batch_size"] * cfg["seq_len"] / dt
        eta = (self.end - step) * (time.time() - self.t_start) / (step - self.step_start)
        self.log(f"step {step}/{self.total} | loss {mean:.3f} | bpc {mean / math.log(2):.3f} | lr {float(lr):.2e} | "
                 f"scale {sc['scale']:g} | skipped {sc['skipped']} | {1000 * dt / self.n:.0f} ms | "
                 f"{cps / 1e6:.3g}M chars/s | eta {duration(eta)}")
        norm = grad_norm.item()  # inf or nan on a skipped fp16 step: null in JSON
        self.record({"step": step, "loss": mean, "bpc": mean / math.log(2), "lr": float(lr),
                     "grad_norm": norm if math.isfinite(norm) else None, "scale": sc["scale"],
                     "skipped": sc["skipped"], "chars_per_s": cps})
        self.loss_sum, self.n, self.t0, self.skipped_before = torch.zeros_like(self.loss_sum), 0, time.time(), \
            sc["skipped"]

    def heldout(self, step, split, bpc):
        self.log(f"step {step}/{self.total} | val bpc {bpc:.3f}" if split == "val" else f"final | test bpc {bpc:.3f}")
        self.record({"step": step, f"{split}_bpc": bpc})

    @contextlib.contextmanager
    def paused(self):
        """The with-block's time (an evaluation, a checkpoint) stays out of the logged speed."""
        if self.d.device.type == "cuda":  # the queued steps first
            torch.cuda.synchronize()
        t = time.time()
        yield
        self.t0 += time.time() - t

    def saved(self, step):
        self.last_ok = step

    def last_good(self):
        return f"the last good checkpoint is in {self.cfg['out']} (step {self.last_ok})" \
            if self.last_ok is not None else "no checkpoint was saved yet"

    def record(self, event):
        if self.d.main:
            try:
                append_metrics(self.cfg["out"], event)
            except OSError as e:  # a full disk
                raise SystemExit(f"error: cannot write {self.cfg['out']}/metrics.jsonl ({type(e).__name__}: {e}); "
                                 f"{self.last_good()}")
