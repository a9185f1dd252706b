"""Train the byte-level mLSTM language model: one script for one process or many (torchrun).

Puri et al. 2018 (arXiv 1808.01371), "Training": Adam, truncated BPTT with the state carried across
windows of each row, learning rate decayed linearly to zero over min(iters, epochs x steps/epoch),
a base learning rate for batch 128 scaled to the global batch (none / linear / sqrt rules),
gradient clipping, mixed precision (fp16.py) and data parallelism (distributed.py).

    python train.py                                           # the bundled demo: data/reviews.txt.gz, CPU
    python train.py --data corpus.jsonl.gz --hidden 4096 --batch-size 128 --seq-len 256 --dtype fp16
    python train.py --data corpus.jsonl.gz --hidden 1024 --batch-size 256 --seq-len 256 --dtype fp16 --cuda-graph
    python train.py --data corpus.jsonl.gz --hidden 4096 --batch-size 512 --seq-len 256 --dtype fp16 --triton
    python train.py --data corpus.jsonl.gz --hidden 8192 --batch-size 1024 --seq-len 256 --dtype fp16 --recompute 32
    torchrun --standalone --nproc_per_node=8 train.py --data DIR --batch-size 1024 --lr-rule sqrt ...
    python train.py --out out/demo --resume                   # continue a run exactly where it stopped
    python train.py --out out/demo --export demo.pt           # its weights in fp16 + config: a released model
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts=3 ... train.py ... --resume   # restart on failure

--out DIR receives config.json, metrics.jsonl (one JSON object per log/eval event) and ckpt.pt
(the previous one kept as ckpt.prev.pt), loaded with torch.load(weights_only=True).
"""
import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import os
import sys
import time
import traceback

import numpy as np
import torch

import data
import distributed
import fp16
from mlstm import MLSTM, PRESETS, detach_state, loss_fn, model_config, read_checkpoint

# Flags that steer one invocation but not the computation: they may change on --resume (a run folder may move).
RUN_FLAGS = {"resume", "export", "stop_at", "log_every", "eval_every", "eval_iters", "save_every", "sample_chars",
             "device", "timeout", "out", "cache_dir", "cuda_graph", "triton", "recompute"}
# A mean loss above this (nats per byte; 10x a uniform guess over 256 bytes, 80 bits per byte) is divergence
# even when finite: a too-high learning rate sends the loss to millions, not to inf.
DIVERGED_LOSS = 10 * math.log(256)


def scaled_lr(lr, rule, batch):
    """The paper's rules for a base lr given at batch 128: none, linear (x B/128), sqrt (x sqrt(B/128))."""
    return {"none": lr, "linear": lr * batch / 128, "sqrt": lr * math.sqrt(batch / 128)}[rule]


def lr_at(step, peak, warmup, total):
    """Linear warmup from 0 over `warmup` steps, then linear decay to 0 at `total`. A float32 tensor, on
    the device of `step` when that is a tensor (train.py's count of taken steps, kept on the GPU)."""
    step = torch.as_tensor(step)
    warm = peak * (step + 1) / max(1, warmup)
    decay = (peak * (total - step) / max(1, total - warmup)).clamp(min=0.0)
    return torch.where(step < warmup, warm, decay).float()


def to_device(a, device):
    """A host array to the device; on CUDA through pinned memory, so that the copy does not wait for the GPU."""
    t = torch.from_numpy(a)
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, loader, iters, device):
    """Bits per character over the first `iters` windows of a held-out stream, state carried."""
    state, total = model.zero_state(len(loader.rows)), torch.zeros((), device=device)
    n = min(iters, loader.steps_per_epoch)
    for k in range(n):
        x, y = (torch.from_numpy(a).to(device) for a in loader.batch(k))
        logits, state = model(x, state)
        total += loss_fn(logits, y)
    return distributed.all_reduce_mean(total / n).item() / math.log(2)


@torch.no_grad()
def sample(model, prime, n, temperature=0.8, seed=0):
    """n bytes sampled after `prime`, one step at a time, as text (invalid UTF-8 replaced)."""
    device = model.wh.device
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([list(prime)], device=device)
    logits, state = model(x)
    out = []
    for _ in range(n):
        probs = torch.softmax(logits[0, -1].float() / temperature, -1)
        b = torch.multinomial(probs, 1, generator=g)
        out.append(int(b))
        logits, state = model(b.view(1, 1), state)
    return (prime + bytes(out)).decode("utf-8", errors="replace")


def duration(seconds):
    h, m, s = int(seconds // 3600), int(seconds % 3600 // 60), int(seconds % 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def save_checkpoint(path, ckpt):
    """Write to a temporary file, keep the previous checkpoint as .prev, then rename into place.

    A process killed at any point leaves ckpt.pt or ckpt.prev.pt complete (load_checkpoint takes the first
    readable one). A failed write (disk full) removes the partial file, leaves ckpt.pt as it was and exits."""
    tmp, prev = path + ".tmp", path[:-3] + ".prev.pt"
    rotated = False
    try:
        torch.save(ckpt, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.replace(path, prev)
            rotated = True
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):  # put the good checkpoint back where it was
            if rotated:
                os.replace(prev, path)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise SystemExit(f"error: cannot write the checkpoint {path} ({type(e).__name__}: {e}); the previous "
                         f"checkpoint, if any, is left as it was (resume with --resume once there is room)")


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


def load_checkpoint(out, config, log, main=True):
    """The newest readable checkpoint in `out` (ckpt.pt, else ckpt.prev.pt), checked against config.

    Every entry's CRC-32 is checked first (mlstm.read_checkpoint): a flipped bit is not a different weight.
    An unreadable ckpt.pt is renamed ckpt.pt.corrupt (by the main process), so that the next save does not
    rotate it over the good ckpt.prev.pt. Checkpoints present but none usable: an error, not a fresh start."""
    bad = []
    for path in (os.path.join(out, "ckpt.pt"), os.path.join(out, "ckpt.prev.pt")):
        if not os.path.exists(path):
            continue
        try:
            ckpt = read_checkpoint(path)
            missing = {"model", "optimizer", "scaler", "step", "state", "rng", "config"} - set(ckpt)
            if missing or not isinstance(ckpt["config"], dict):
                raise KeyError(f"not a train.py checkpoint: no {sorted(missing) or 'config dict'}")
            diff = {k: (ckpt["config"].get(k), v) for k, v in config.items()
                    if k not in RUN_FLAGS and ckpt["config"].get(k) != v}
            if diff:
                raise SystemExit(f"error: {path} was trained with another configuration; differences "
                                 f"(checkpoint vs command): {diff}. Use another --out or the same flags.")
            with torch.device("meta"):  # the shapes the configuration makes, without allocating them
                want = {k: tuple(v.shape) for k, v in MLSTM(**model_config(config)).state_dict().items()}
            got = {k: tuple(getattr(v, "shape", ())) for k, v in ckpt["model"].items()}
            if got != want:
                raise ValueError(f"its weights do not fit its configuration: "
                                 f"{sorted(set(got.items()) ^ set(want.items()))[:4]}")
        except Exception as e:  # truncated, corrupted, a pickle that would run code, a foreign file
            bad.append(f"{path}: {type(e).__name__}: {str(e)[:200]}")
            log(f"warning: {path} is unusable ({type(e).__name__}: {str(e)[:200]}); trying the previous one")
            if main and path.endswith("ckpt.pt"):
                try:
                    os.replace(path, path + ".corrupt")
                    log(f"warning: moved it to {path}.corrupt")
                except OSError:
                    pass
            continue
        log(f"resuming from {path} at step {ckpt['step']}")
        return ckpt
    if bad:
        raise SystemExit(f"error: --resume: no usable checkpoint in {out} ({'; '.join(bad)}). Move them away "
                         f"to start afresh.")
    log(f"--resume: no checkpoint in {out} yet: starting at step 0")  # a first start under torchrun --max-restarts
    return None


def export(out, path, log=print):
    """A released model: --out's checkpoint's weights in fp16 with its config and step, nothing to resume with.

    fp16 halves the file; its rounding (at most 2^-11 relative per weight) left a 512-unit model's held-out
    BPC unchanged to 6 digits (1.634526 from the fp32 checkpoint and from its export, 2026-11-26)."""
    src = os.path.join(out, "ckpt.pt")
    try:
        ckpt = read_checkpoint(src)
        weights = {k: v.half() for k, v in ckpt["model"].items()}
        config, step = ckpt["config"], ckpt["step"]
    except Exception as e:  # none yet, truncated, corrupted, a foreign file
        raise SystemExit(f"error: --export: {src} is not a usable train.py checkpoint ({type(e).__name__}: "
                         f"{str(e)[:200]})")
    if not all(w.isfinite().all() for w in weights.values()):
        raise SystemExit(f"error: --export: {src} has weights beyond fp16's range")
    if os.path.lexists(path):  # only an earlier export is written over
        try:
            held = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise SystemExit(f"error: --export: {path} exists and is not a model file to replace ({type(e).__name__}); "
                             f"remove it or export to another path")
        if not isinstance(held, dict) or "optimizer" in held:
            raise SystemExit(f"error: --export: {path} is a train.py checkpoint (it holds an optimizer state); "
                             f"export to another path")
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save({"model": weights, "config": config, "step": step}, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports an unwritable path as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise SystemExit(f"error: --export: cannot write {path} ({type(e).__name__}: {e})")
    log(f"export: {src} (step {step}, hidden {config['hidden']}) -> {path}: fp16 weights, "
        f"{os.path.getsize(path) / 2**20:.1f} MiB")


def main(cfg):
    d = distributed.setup(cfg["device"], cfg["timeout"])
    if cfg["cuda_graph"] and d.device.type != "cuda":
        raise SystemExit(f"error: --cuda-graph needs a CUDA device, and this run is on {d.device}")
    if cfg["triton"] and (d.device.type != "cuda" or not importlib.util.find_spec("triton")):
        raise SystemExit(f"error: --triton needs a CUDA device (this run is on {d.device}) and the triton package "
                         "(torch's CUDA wheels install it)")
    log = (lambda *a: print(*a, flush=True)) if d.main else (lambda *a: None)
    if d.main:
        try:
            os.makedirs(cfg["out"], exist_ok=True)
        except OSError as e:
            raise SystemExit(f"error: cannot write to --out {cfg['out']}: {e}")
        if not os.access(cfg["out"], os.W_OK):
            raise SystemExit(f"error: cannot write to --out {cfg['out']}: permission denied")
    # Held while this run writes --out: a second run into it would interleave the logs and rotate away the
    # checkpoints. Windows has no such lock.
    busy = f"another run is using --out {cfg['out']} (it holds .lock there); wait for it to end or give another --out"
    try:
        with data.locked(os.path.join(cfg["out"], ".lock"), log, busy) if d.main else contextlib.nullcontext():
            train(cfg, d, log)
    except data.DataError as e:  # the lock's (train turns its own data errors into messages)
        raise SystemExit(f"error: {e}")


def train(cfg, d, log):
    """The run itself, for main: data, model, optimizer, checkpoint to resume from, the training loop."""
    log("config: " + json.dumps(cfg))

    # Data: rank 0 prepares a raw source once (cached); the others wait, then memory-map the same files.
    try:
        if d.main:
            corpus = data.resolve(cfg["data"], cfg["cache_dir"], cfg["text_field"], cfg["val_frac"],
                                  cfg["test_frac"], log=log)
        distributed.barrier()
        if not d.main:
            corpus = data.resolve(cfg["data"], cfg["cache_dir"], cfg["text_field"], cfg["val_frac"], cfg["test_frac"])
        B, T = cfg["batch_size"], cfg["seq_len"]
        loader = data.ByteLoader(os.path.join(corpus, "train.bin"), B, T, d.rank, d.world)
        evals = {}
        for split in ("val", "test"):
            path, w = os.path.join(corpus, split + ".bin"), d.world
            rows = min(B, os.path.getsize(path) // (T + 1) // w * w)  # fewer rows for a small held-out set
            if rows > 0:
                evals[split] = data.ByteLoader(path, rows, T, d.rank, d.world)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # e.g. an unwritable --cache-dir
        raise SystemExit(f"error: cannot prepare {cfg['data']} in --cache-dir {cfg['cache_dir']} "
                         f"({type(e).__name__}: {e})")
    spe = loader.steps_per_epoch
    total = min(cfg["iters"] or math.inf, max(1, round(cfg["epochs"] * spe)) if cfg["epochs"] else math.inf)
    if total >= 2**62:
        raise SystemExit(f"error: --epochs {cfg['epochs']:g} makes {total:.3g} steps of {spe} per epoch: too many")
    end = min(total, cfg["stop_at"] or total)
    peak = scaled_lr(cfg["lr"], cfg["lr_rule"], B)
    log(f"data: {corpus}: {len(loader.data) / 1e6:.1f} MB train, {spe} steps per epoch; "
        f"{total} steps, {total * B * T / 1e6:.1f}M chars, peak lr {peak:.3g}")
    if cfg["warmup"] >= total:
        log(f"warning: --warmup {cfg['warmup']} is not below the run's {total} steps: the lr never decays")

    torch.manual_seed(cfg["seed"])
    model = MLSTM(**model_config(cfg))
    ckpt = load_checkpoint(cfg["out"], cfg, log, d.main) if cfg["resume"] else None
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if d.main:
        start_run_files(cfg, ckpt["step"] if ckpt else 0, log)
    model.to(d.device)
    distributed.broadcast_params(model)
    mp = fp16.MixedPrecision(model, cfg["dtype"], cfg["loss_scale"], cfg["scale_growth"],
                             dynamic=not cfg["static_loss_scale"])
    model.cuda_graph, model.triton, model.recompute = cfg["cuda_graph"], cfg["triton"], cfg["recompute"]
    opt = mp.optimizer(peak)
    reduce = distributed.GradReducer(cfg["bucket_mb"], torch.float32 if cfg["comm_fp32"] else None)
    step, local = 0, B // d.world
    state = model.zero_state(local)
    if ckpt:
        # Adam's moments and step counts resume; its settings are this run's: the device lr tensor and the fused
        # flag (a checkpoint from before fused Adam holds a float lr and no flag).
        saved = ckpt["optimizer"]["param_groups"]
        groups = [{**g, "params": s["params"]} for g, s in zip(opt.state_dict()["param_groups"], saved)]
        opt.load_state_dict({"state": ckpt["optimizer"]["state"], "param_groups": groups})
        mp.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        rows = slice(d.rank * local, (d.rank + 1) * local)
        state = tuple(s[rows].to(d.device, fp16.DTYPES[cfg["dtype"]]) for s in ckpt["state"])
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg['dtype']} on "
        f"{d.device} x {d.world} process(es)")

    def checkpoint():
        full = [distributed.gather_rows(s.float()).cpu() for s in state]
        if d.main:
            save_checkpoint(os.path.join(cfg["out"], "ckpt.pt"), {
                "model": mp.master_state_dict(), "optimizer": opt.state_dict(), "scaler": mp.state_dict(),
                "step": step, "state": full, "rng": torch.get_rng_state(), "config": cfg})

    def pause_clock():
        """The time once the queued steps are done: checkpoints and evaluations stay out of the logged speed."""
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        return time.time()

    def last_good():
        return f"the last good checkpoint is in {cfg['out']} (step {last_ok})" if last_ok is not None else \
            "no checkpoint was saved yet"

    def record(event):
        if d.main:
            try:
                with open(os.path.join(cfg["out"], "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(event) + "\n")
            except OSError as e:  # a full disk
                raise SystemExit(f"error: cannot write {cfg['out']}/metrics.jsonl ({type(e).__name__}: {e}); "
                                 f"{last_good()}")

    loss_sum, n_loss, t0, last_ok = torch.zeros((), device=d.device), 0, time.time(), step if ckpt else None
    t_start, step_start, skipped_before = t0, step, mp.state_dict()["skipped"]
    while step < end:
        if loader.window(step) == 0:  # the streams restart at each epoch: so does the state
            state = model.zero_state(local)
        x, y = (to_device(a, d.device) for a in loader.batch(step))
        lr = lr_at(step - mp.skipped, peak, cfg["warmup"], total)  # a skipped step does not advance the schedule
        opt.param_groups[0]["lr"].copy_(lr)
        logits, state = model(x, state)
        state = detach_state(state)
        loss = loss_fn(logits, y)
        mp.backward(loss)
        grad_norm, _ = mp.step(opt, cfg["clip"], reduce)
        loss_sum += loss.detach()
        n_loss += 1
        step += 1
        if step % cfg["log_every"] == 0 or step == end:
            mean = distributed.all_reduce_mean(loss_sum / n_loss).item()
            sc = mp.state_dict()  # the loss scale and counts, read back from the device at log time only
            # fp16: the scaler halves S on overflow; S at its floor of 1 (dynamic), or a static S with every step
            # since the last log skipped, has nothing left to rescue: that is divergence too.
            stuck = (sc["scale"] <= 1.0 and sc["good_steps"] == 0 if mp.dynamic
                     else sc["skipped"] - skipped_before == n_loss)
            diverged = not mean < DIVERGED_LOSS or (sc["skipped"] and (cfg["dtype"] != "fp16" or stuck))
            if diverged:
                raise SystemExit(f"error: training diverged at step {step} (loss {mean}, {sc['skipped']} skipped "
                                 f"steps, loss scale {sc['scale']:g}); {last_good()}. Lower --lr or raise --warmup.")
            dt = time.time() - t0
            cps = n_loss * B * T / dt
            eta = (end - step) * (time.time() - t_start) / (step - step_start)
            log(f"step {step}/{total} | loss {mean:.3f} | bpc {mean / math.log(2):.3f} | lr {float(lr):.2e} | "
                f"scale {sc['scale']:g} | skipped {sc['skipped']} | {1000 * dt / n_loss:.0f} ms | "
                f"{cps / 1e6:.3g}M chars/s | eta {duration(eta)}")
            norm = grad_norm.item()  # inf or nan on a skipped fp16 step: null in JSON
            record({"step": step, "loss": mean, "bpc": mean / math.log(2), "lr": float(lr),
                    "grad_norm": norm if math.isfinite(norm) else None, "scale": sc["scale"],
                    "skipped": sc["skipped"], "chars_per_s": cps})
            loss_sum, n_loss, t0, skipped_before = torch.zeros((), device=d.device), 0, time.time(), sc["skipped"]
        if (step % cfg["eval_every"] == 0 or step == total) and "val" in evals:
            paused = pause_clock()
            val = evaluate(model, evals["val"], cfg["eval_iters"], d.device)
            log(f"step {step}/{total} | val bpc {val:.3f}")
            record({"step": step, "val_bpc": val})
            t0 += time.time() - paused
        if step == total and "test" in evals:
            test = evaluate(model, evals["test"], cfg["eval_iters"], d.device)
            log(f"final | test bpc {test:.3f}")
            record({"step": step, "test_bpc": test})
        # After the step's events: a run killed once its checkpoint is written resumes with all of them logged.
        if step % cfg["save_every"] == 0 or step == end:  # save steps are log steps (--save-every is checked)
            paused = pause_clock()
            checkpoint()
            last_ok, t0 = step, t0 + time.time() - paused
    if step_start == total:  # --resume of a finished run: its final evaluation is already in metrics.jsonl
        log(f"--resume: the run in {cfg['out']} was already complete at step {total}: nothing to do")
    elif step == total and cfg["sample_chars"] and d.main:
        log("sample: " + sample(model, b"\n ", cfg["sample_chars"], seed=cfg["seed"]))
    distributed.cleanup()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a byte-level mLSTM language model (Puri et al. 2018).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/reviews.txt.gz",
                   help="a prepared corpus folder (data.py), or a raw source: text, .jsonl[.gz], .csv, aclImdb")
    p.add_argument("--out", default="out/demo", help="folder for config.json, metrics.jsonl, ckpt.pt")
    p.add_argument("--cache-dir", default="data/prepared", help="where raw sources are prepared on first use")
    p.add_argument("--text-field", default="reviewText", help="JSON field / CSV column of the text")
    p.add_argument("--val-frac", type=float, default=0.01, help="documents held out for validation (paper 0.001)")
    p.add_argument("--test-frac", type=float, default=0.01, help="documents held out for test (paper 0.001)")
    p.add_argument("--hidden", default="demo", help=f"mLSTM units: an integer or a preset {PRESETS}")
    p.add_argument("--embed", type=int, default=64, help="byte embedding size")
    p.add_argument("--no-weight-norm", action="store_true", help="turn off weight normalisation")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (rows), over all processes")
    p.add_argument("--seq-len", type=int, default=64, help="truncated-BPTT window (paper: 256)")
    p.add_argument("--iters", type=int, default=1500, help="training steps (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=0, help="epochs; with --iters the smaller wins (0: off)")
    p.add_argument("--stop-at", type=int, default=0, help="end this invocation at this step (schedule unchanged)")
    p.add_argument("--lr", type=float, default=2e-3, help="base learning rate, for batch 128 under --lr-rule (paper 5e-4)")
    p.add_argument("--lr-rule", choices=["none", "linear", "sqrt"], default="none", help="scaling of --lr to the batch")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--dtype", choices=list(fp16.DTYPES), default="fp32", help="compute precision")
    p.add_argument("--loss-scale", type=float, default=2.0**16, help="initial fp16 loss scale")
    p.add_argument("--static-loss-scale", action="store_true", help="keep --loss-scale fixed")
    p.add_argument("--scale-growth", type=int, default=1000, help="good steps before the loss scale doubles")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="all-reduce bucket size in MB")
    p.add_argument("--comm-fp32", action="store_true", help="all-reduce in float32 (default: compute dtype)")
    p.add_argument("--seed", type=int, default=1, help="seed of the initial weights and the sample")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--cuda-graph", action="store_true", help="replay the recurrent loop's forward and backward as "
                   "CUDA graphs: faster where kernel launches dominate the step (BENCHMARKS.md); CUDA only")
    p.add_argument("--triton", action="store_true", help="the recurrent loop's gate math as two fused Triton "
                   "kernels (kernels.py), one per direction, instead of 6 and 5 torch ops per step; CUDA only")
    p.add_argument("--recompute", type=int, default=0, metavar="S", help="activation checkpointing in segments of "
                   "S timesteps (e.g. 32 at --seq-len 256; 0: off): the loop's activations are recomputed in "
                   "backward, for a larger batch in the same memory at one more forward (mlstm.recomputed); not "
                   "with --cuda-graph")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint if there is one")
    p.add_argument("--export", metavar="PATH", help="write --out's checkpoint as a released model (fp16 weights "
                   "and config, for transfer.py and generate.py) to PATH and exit without training")
    p.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    p.add_argument("--eval-every", type=int, default=200, help="steps between validation")
    p.add_argument("--eval-iters", type=int, default=50, help="validation windows per evaluation")
    p.add_argument("--save-every", type=int, default=200, help="steps between checkpoints (a multiple of --log-every)")
    p.add_argument("--sample-chars", type=int, default=300, help="bytes sampled at the end (0: none)")
    p.add_argument("--timeout", type=float, default=600, help="seconds a process waits for the others in a "
                   "collective before it ends with an error (a rank that died or hangs)")
    a = p.parse_args(argv)
    a.hidden = PRESETS.get(a.hidden) or (int(a.hidden) if a.hidden.isdigit() else p.error(
        f"--hidden must be an integer or one of {list(PRESETS)}"))
    big = 2**62  # steps, counts and seeds become int64 on the device
    for name in ("hidden", "embed", "batch_size", "seq_len", "log_every", "eval_every", "eval_iters", "save_every"):
        if not 0 < getattr(a, name) < big:
            p.error(f"--{name.replace('_', '-')} must be positive (and below 2^62)")
    for name in ("iters", "stop_at", "warmup", "seed", "sample_chars", "recompute"):
        if not 0 <= getattr(a, name) < big:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (and below 2^62)")
    if not 0 <= a.epochs < math.inf:
        p.error("--epochs must be >= 0 and finite (0: off)")
    if not (0 <= a.val_frac < 1 and 0 <= a.test_frac < 1 and a.val_frac + a.test_frac < 1):
        p.error("--val-frac and --test-frac must be >= 0, with a sum below 1")
    if a.iters == 0 and a.epochs == 0:
        p.error("give --iters or --epochs")
    if a.save_every % a.log_every:
        p.error("--save-every must be a multiple of --log-every (checkpoints follow a finite-loss check)")
    if not (0 < a.lr < math.inf and 0 <= a.clip < math.inf and 1 <= a.loss_scale < 2**64):
        p.error("--lr must be > 0, --clip >= 0, --loss-scale in [1, 2^64), all finite")
    if not 1 <= a.scale_growth < big:
        p.error("--scale-growth must be >= 1 (steps; and below 2^62)")
    if not 0 <= a.bucket_mb < math.inf:
        p.error("--bucket-mb must be >= 0 and finite")
    if a.device != "auto" and (why := distributed.device_problem(a.device, ("auto", "cpu", "cuda"))):
        p.error(why)
    if not 0 < a.timeout < 1e9:
        p.error("--timeout must be > 0 and below 1e9 seconds")
    if a.recompute and a.cuda_graph:
        p.error("--recompute does not combine with --cuda-graph")
    return vars(a)


if __name__ == "__main__":
    try:
        cfg = parse_args()
        if cfg["export"]:
            export(cfg["out"], cfg["export"])
        else:
            main(cfg)
    except RuntimeError as e:  # out of memory; under torchrun also a peer that died or hangs (gloo, NCCL)
        multi = distributed.dist.is_initialized()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if distributed.out_of_memory(e):
            why = f"out of memory ({first}); lower --batch-size (or --hidden), or add --recompute 32"
        elif multi and (isinstance(e, distributed.dist.DistError) or "gloo" in str(e) or "NCCL" in str(e)):
            why = (f"a collective with the other processes failed ({first}). Another process died or stopped "
                   f"answering (see its log; --timeout bounds the wait); restart with --resume to continue from "
                   f"the last checkpoint.")
        elif multi:  # not the peers' fault: the whole story
            traceback.print_exc()
            why = f"{type(e).__name__}: {first}"
        else:
            raise
        print(f"error: {f'rank {distributed.dist.get_rank()}: ' if multi else ''}{why}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # not sys.exit: the process group's threads, still waiting on the lost peer, abort an exit
    except KeyboardInterrupt:  # ctrl-C: what the last checkpoint holds is safe (written atomically)
        print("interrupted: continue from --out's last checkpoint with the same command plus --resume",
              file=sys.stderr, flush=True)
        sys.exit(130)
