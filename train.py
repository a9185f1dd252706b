"""Train the byte-level mLSTM language model: one script for one process or many (torchrun).

Puri et al. 2018 (arXiv 1808.01371), "Training": Adam, truncated BPTT with the state carried across the
windows of each row (data.ByteLoader), the learning rate decayed linearly to zero over min(iters, epochs x
steps/epoch), a base learning rate for batch 128 scaled to the global batch (the paper's none / linear / sqrt
rules), gradient clipping, mixed precision (fp16.py) and data parallelism (distributed.py).

    python train.py                                           # the bundled demo: data/reviews.txt.gz, CPU
    python train.py --data corpus.jsonl.gz --hidden 4096 --batch-size 128 --seq-len 256 --dtype fp16
    python train.py --data corpus.jsonl.gz --hidden 1024 --batch-size 512 --seq-len 256 --dtype fp16 --cuda-graph --triton
    python train.py --data corpus.jsonl.gz --hidden 8192 --batch-size 1024 --seq-len 256 --dtype fp16 --recompute 32
    torchrun --standalone --nproc_per_node=8 train.py --data DIR --batch-size 1024 --lr-rule sqrt ...
    python train.py --out out/demo --resume                   # continue a run exactly where it stopped
    python train.py --out out/demo --export demo.pt           # its weights in fp16 + config: a released model
    python train.py --data my_reviews.txt --init models/openai-4096.pt --lr 2e-4 --iters 2000   # adapt a model
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts=3 ... train.py ... --resume   # restart on failure

--out DIR receives config.json, metrics.jsonl (one JSON object per log/eval event) and ckpt.pt (the previous
one kept as ckpt.prev.pt): plumbing/run_folder.py and plumbing/checkpoints.py. The fast paths that
--cuda-graph, --triton and --recompute turn on are fast/loop.py's, tested equal to the plain loop.
"""
import argparse
import importlib.util
import json
import math
import os

import torch

import data
import distributed
import fp16
from fast.loop import FastLoop
from mlstm import MLSTM, PRESETS, detach_state, loss_fn, model_config, sample
from plumbing import cli
from plumbing.checkpoints import (export, load_checkpoint, load_pretrained, read_checkpoint, restore, save_checkpoint,
                                  training_checkpoint)
from plumbing.run_folder import RunLog, claimed, start_run_files


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


def train(cfg, d, log):
    """The run itself: data, model, optimizer, the checkpoint to resume from, the training loop."""
    log("config: " + json.dumps(cfg))
    corpus, loader, evals = open_corpus(cfg, d, log)
    total, end, peak = schedule(cfg, corpus, loader, log)
    local = cfg["batch_size"] // d.world  # this process's rows

    torch.manual_seed(cfg["seed"])
    model = MLSTM(**model_config(cfg))
    ckpt = load_checkpoint(cfg["out"], cfg, log, d.main) if cfg["resume"] else None
    if ckpt:
        model.load_state_dict(ckpt["model"])
    elif cfg["init"]:  # a pretrained model adapted to this text (ULMFiT's step 2): its weights, a fresh schedule
        model.load_state_dict(load_pretrained(cfg["init"])[0].state_dict())
        log(f"init: the weights of {cfg['init']}, with a fresh optimizer and schedule")
    if d.main:
        start_run_files(cfg, ckpt["step"] if ckpt else 0, log)
    model.to(d.device)
    distributed.broadcast_params(model)  # every replica starts from rank 0's weights
    # Half-precision compute with float32 master weights in the optimizer, and loss scaling for fp16 (fp16.py).
    mp = fp16.MixedPrecision(model, cfg["dtype"], cfg["loss_scale"], cfg["scale_growth"],
                             dynamic=not cfg["static_loss_scale"])
    # The time loop, chosen here: with --reference-loop mlstm.py's own loop of `cell` under autograd, the equations
    # as written; else fast/loop.py's, tested equal to it: a hand-written backward (1.4x faster on a CPU), with
    # CUDA graphs, Triton kernels or recompute as the flags ask.
    loop = None if cfg["reference_loop"] else FastLoop(cfg["cuda_graph"], cfg["triton"], cfg["recompute"])
    opt = mp.optimizer(peak)
    reduce = distributed.GradReducer(cfg["bucket_mb"], torch.float32 if cfg["comm_fp32"] else None)
    rows = slice(d.rank * local, (d.rank + 1) * local)
    step, state = restore(ckpt, opt, mp, rows, d.device, fp16.DTYPES[cfg["dtype"]]) if ckpt else \
        (0, model.zero_state(local))
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg['dtype']} on "
        f"{d.device} x {d.world} process(es)")
    run = RunLog(cfg, d, mp, step, total, end, log, resumed=ckpt is not None)

    step_start = step
    while step < end:
        if loader.window(step) == 0:  # the streams restart at each epoch: so does the state
            state = model.zero_state(local)
        x, y = (to_device(a, d.device) for a in loader.batch(step))
        lr = lr_at(step - mp.skipped, peak, cfg["warmup"], total)  # a skipped step does not advance the schedule
        opt.param_groups[0]["lr"].copy_(lr)
        logits, state = model(x, state, loop=loop)
        state = detach_state(state)  # truncated BPTT: the state carries over, its gradient does not
        loss = loss_fn(logits, y)
        mp.backward(loss)  # of loss * S
        grad_norm, _ = mp.step(opt, cfg["clip"], reduce)  # all-reduce, unscale, clip, then step or skip
        run.add(loss)
        step += 1
        if step % cfg["log_every"] == 0 or step == end:
            run.report(step, lr, grad_norm)  # the log line; stops a diverged run
        if (step % cfg["eval_every"] == 0 or step == total) and "val" in evals:
            with run.paused():
                run.heldout(step, "val", evaluate(model, evals["val"], cfg["eval_iters"], d.device))
        if step == total and "test" in evals:
            run.heldout(step, "test", evaluate(model, evals["test"], cfg["eval_iters"], d.device))
        # After the step's events: a run killed once its checkpoint is written resumes with all of them logged.
        if step % cfg["save_every"] == 0 or step == end:  # save steps are log steps (--save-every is checked)
            with run.paused():
                ckpt = training_checkpoint(mp, opt, step, state, cfg)  # on every rank: it gathers the state
                if d.main:
                    save_checkpoint(os.path.join(cfg["out"], "ckpt.pt"), ckpt)
            run.saved(step)
    if step_start == total:  # --resume of a finished run: its final evaluation is already in metrics.jsonl
        log(f"--resume: the run in {cfg['out']} was already complete at step {total}: nothing to do")
    elif step == total and cfg["sample_chars"] and d.main:
        text = sample(model, b"\n ", cfg["sample_chars"], temperature=0.8, seed=cfg["seed"])[0]
        log("sample: " + text.decode("utf-8", errors="replace"))
    distributed.cleanup()


def open_corpus(cfg, d, log):
    """The train loader and the val/test loaders of --data: rank 0 prepares a raw source once (cached); the
    others wait, then memory-map the same files. A held-out split too small for the batch gets fewer rows."""
    try:
        where = (cfg["data"], cfg["cache_dir"], cfg["text_field"], cfg["val_frac"], cfg["test_frac"])
        if d.main:
            corpus = data.resolve(*where, log=log, allow_binary=cfg["allow_binary"])
        distributed.barrier()
        if not d.main:
            corpus = data.resolve(*where, allow_binary=cfg["allow_binary"])
        B, T = cfg["batch_size"], cfg["seq_len"]
        loader, evals = data.ByteLoader(os.path.join(corpus, "train.bin"), B, T, d.rank, d.world), {}
        for split in ("val", "test"):
            path, w = os.path.join(corpus, split + ".bin"), d.world
            rows = min(B, os.path.getsize(path) // (T + 1) // w * w)
            if rows > 0:
                evals[split] = data.ByteLoader(path, rows, T, d.rank, d.world)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # e.g. an unwritable --cache-dir
        raise SystemExit(f"error: cannot prepare {cfg['data']} in --cache-dir {cfg['cache_dir']} "
                         f"({type(e).__name__}: {e})")
    return corpus, loader, evals


def schedule(cfg, corpus, loader, log):
    """(total steps, the step this invocation ends at, the peak lr after the batch-size rule)."""
    spe, B, T = loader.steps_per_epoch, cfg["batch_size"], cfg["seq_len"]
    total = min(cfg["iters"] or math.inf, max(1, round(cfg["epochs"] * spe)) if cfg["epochs"] else math.inf)
    if total >= 2**62:
        raise SystemExit(f"error: --epochs {cfg['epochs']:g} makes {total:.3g} steps of {spe} per epoch: too many")
    peak = scaled_lr(cfg["lr"], cfg["lr_rule"], B)
    log(f"data: {corpus}: {len(loader.data) / 1e6:.1f} MB train, {spe} steps per epoch; "
        f"{total} steps, {total * B * T / 1e6:.1f}M chars, peak lr {peak:.3g}")
    if cfg["warmup"] >= total:
        log(f"warning: --warmup {cfg['warmup']} is not below the run's {total} steps: the lr never decays")
    return total, min(total, cfg["stop_at"] or total), peak


def to_device(a, device):
    """A host array to the device; on CUDA through pinned memory, so that the copy does not wait for the GPU."""
    t = torch.from_numpy(a)
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def main(cfg):
    d = distributed.setup(cfg["device"], cfg["timeout"])
    if cfg["cuda_graph"] and d.device.type != "cuda":
        raise SystemExit(f"error: --cuda-graph needs a CUDA device, and this run is on {d.device}")
    if cfg["triton"] and (d.device.type != "cuda" or not importlib.util.find_spec("triton")):
        raise SystemExit(f"error: --triton needs a CUDA device (this run is on {d.device}) and the triton package "
                         "(torch's CUDA wheels install it)")
    log = (lambda *a: print(*a, flush=True)) if d.main else (lambda *a: None)  # rank 0 speaks for all
    with claimed(cfg["out"], d.main, log):
        train(cfg, d, log)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a byte-level mLSTM language model (Puri et al. 2018).",
                                formatter_class=cli.Help)
    # The papers' hyperparameters; Radford et al. 2017 / Puri et al. 2018 values in brackets (README's table).
    h = p.add_argument_group("the model and its optimisation (the papers' hyperparameters)")
    h.add_argument("--hidden", help=f"mLSTM units: an integer or a preset {PRESETS} [4096 / 4096, 8192] (default: "
                   "demo; with --init, the file's)")
    h.add_argument("--embed", type=int, help="byte embedding size [64] (default: 64; with --init, the file's)")
    h.add_argument("--no-weight-norm", action="store_true", help="turn off weight normalisation [on] (with --init: "
                   "as the file has it)")
    h.add_argument("--batch-size", type=int, default=32, help="global batch (rows), over all processes [128 / 32k]")
    h.add_argument("--seq-len", type=int, default=64, help="truncated-BPTT window [256]")
    h.add_argument("--lr", type=float, default=2e-3, help="base learning rate, for batch 128 under --lr-rule [5e-4]")
    h.add_argument("--lr-rule", choices=["none", "linear", "sqrt"], default="none", help="scaling of --lr to the "
                   "batch [Puri et al. compare the three]")
    h.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    h.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    h.add_argument("--dtype", choices=list(fp16.DTYPES), default="fp32", help="compute precision [fp32 / fp16]")
    h.add_argument("--loss-scale", type=float, default=2.0**16, help="initial fp16 loss scale")
    h.add_argument("--static-loss-scale", action="store_true", help="keep --loss-scale fixed [dynamic]")
    h.add_argument("--scale-growth", type=int, default=1000, help="good steps before the loss scale doubles")
    h.add_argument("--iters", type=int, default=1500, help="training steps (0: use --epochs)")
    h.add_argument("--epochs", type=float, default=0, help="epochs; with --iters the smaller wins (0: off) [1 / 3]")
    h.add_argument("--seed", type=int, default=1, help="seed of the initial weights and the sample")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="data/reviews.txt.gz",
                   help="a prepared corpus folder (data.py), or a raw source: text, .jsonl[.gz], .csv, aclImdb")
    d.add_argument("--cache-dir", default="data/prepared", help="where raw sources are prepared on first use")
    d.add_argument("--text-field", default="reviewText", help="JSON field / CSV column of the text (a CSV without "
                   "it: its text, sentence or review column)")
    d.add_argument("--allow-binary", action="store_true", help="train on a source that does not look like text")
    d.add_argument("--val-frac", type=float, default=0.01, help="documents held out for validation [0.001]")
    d.add_argument("--test-frac", type=float, default=0.01, help="documents held out for test [0.001]")
    r = p.add_argument_group("the run")
    r.add_argument("--out", default="out/demo", help="folder for config.json, metrics.jsonl, ckpt.pt")
    r.add_argument("--init", metavar="MODEL.pt", help="start from this model file's weights (train.py --export, "
                   "tools/import_weights.py, a checkpoint) with a fresh optimizer and schedule")
    r.add_argument("--resume", action="store_true", help="continue from --out's checkpoint if there is one")
    r.add_argument("--stop-at", type=int, default=0, help="end this invocation at this step (schedule unchanged)")
    r.add_argument("--export", metavar="PATH", help="write --out's checkpoint as a released model (fp16 weights "
                   "and config, for transfer.py and tools/generate.py) to PATH and exit without training")
    r.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    r.add_argument("--eval-every", type=int, default=200, help="steps between validation")
    r.add_argument("--eval-iters", type=int, default=50, help="validation windows per evaluation")
    r.add_argument("--save-every", type=int, default=200, help="steps between checkpoints (a multiple of --log-every)")
    r.add_argument("--sample-chars", type=int, default=300, help="bytes sampled at the end (0: none)")
    f = p.add_argument_group("devices and speed (none changes the numbers beyond rounding)")
    f.add_argument("--device", default="auto", help="auto, cpu, cuda")
    f.add_argument("--reference-loop", action="store_true", help="train through mlstm.py's own time loop of `cell` "
                   "under autograd (the equations as written) instead of fast/loop.py's hand-written backward")
    f.add_argument("--cuda-graph", action="store_true", help="replay the recurrent loop's forward and backward as "
                   "CUDA graphs: faster where kernel launches dominate the step (BENCHMARKS.md); CUDA only")
    f.add_argument("--triton", action="store_true", help="the recurrent loop's gate math as two fused Triton "
                   "kernels (fast/kernels.py), one per direction, instead of 6 and 5 torch ops per step; CUDA only")
    f.add_argument("--recompute", type=int, default=0, metavar="S", help="activation checkpointing in segments of "
                   "S timesteps (e.g. 32 at --seq-len 256; 0: off): the loop's activations are recomputed in "
                   "backward, for a larger batch in the same memory at one more forward (fast/loop.py); not "
                   "with --cuda-graph")
    f.add_argument("--bucket-mb", type=float, default=25.0, help="all-reduce bucket size in MB")
    f.add_argument("--comm-fp32", action="store_true", help="all-reduce in float32 (default: compute dtype)")
    f.add_argument("--timeout", type=float, default=600, help="seconds a process waits for the others in a "
                   "collective before it ends with an error (a rank that died or hangs)")
    a = p.parse_args(argv)
    if a.hidden is not None:
        a.hidden = PRESETS.get(a.hidden) or (int(a.hidden) if a.hidden.lstrip("+-").isdigit() else p.error(
            f"--hidden must be an integer or one of {list(PRESETS)}"))
    if a.init:  # the model's shape is the file's: a flag given with another value is a mistake
        try:
            init = read_checkpoint(a.init)["config"]
            given = dict(hidden=init["hidden"], embed=init["embed"], no_weight_norm=init["no_weight_norm"])
        except Exception as e:  # no such file, not a model file
            p.error(f"--init {a.init}: not a model file ({type(e).__name__}: {str(e)[:200]})")
        for k, v in given.items():
            if getattr(a, k) not in (None, False, v):
                p.error(f"--{k.replace('_', '-')} {getattr(a, k)} conflicts with --init {a.init}, whose {k} is {v}")
            setattr(a, k, v)
    a.hidden = PRESETS["demo"] if a.hidden is None else a.hidden
    a.embed = 64 if a.embed is None else a.embed
    big = 2**62  # steps, counts and seeds become int64 on the device
    cli.require(p, a, ("hidden", "embed", "batch_size", "seq_len", "log_every", "eval_every", "eval_iters",
                       "save_every"), lambda v: 0 < v < big, "positive (and below 2^62)")
    cli.require(p, a, ("iters", "stop_at", "warmup", "seed", "sample_chars", "recompute"), lambda v: 0 <= v < big,
                ">= 0 (and below 2^62)")
    cli.require(p, a, ("epochs",), lambda v: 0 <= v < math.inf, ">= 0 and finite (0: off)")
    if not (0 <= a.val_frac < 1 and 0 <= a.test_frac < 1 and a.val_frac + a.test_frac < 1):
        p.error("--val-frac and --test-frac must be >= 0, with a sum below 1")
    if a.iters == 0 and a.epochs == 0:
        p.error("give --iters or --epochs")
    if a.save_every % a.log_every:
        p.error("--save-every must be a multiple of --log-every (checkpoints follow a finite-loss check)")
    if not (0 < a.lr < math.inf and 0 <= a.clip < math.inf and 1 <= a.loss_scale < 2**64):
        p.error("--lr must be > 0, --clip >= 0, --loss-scale in [1, 2^64), all finite")
    cli.require(p, a, ("scale_growth",), lambda v: 1 <= v < big, ">= 1 (steps; and below 2^62)")
    cli.require(p, a, ("bucket_mb",), lambda v: 0 <= v < math.inf, ">= 0 and finite")
    if a.device != "auto" and (why := cli.device_problem(a.device, ("auto", "cpu", "cuda"))):
        p.error(why)
    cli.require(p, a, ("timeout",), lambda v: 0 < v < 1e9, "> 0 and below 1e9 seconds")
    if a.recompute and a.cuda_graph:
        p.error("--recompute does not combine with --cuda-graph")
    if a.reference_loop and (a.cuda_graph or a.triton or a.recompute):
        p.error("--reference-loop is mlstm.py's plain loop: not with --cuda-graph, --triton or --recompute")
    return vars(a)


if __name__ == "__main__":
    cfg = parse_args()
    cli.main_guard(lambda: export(cfg["out"], cfg["export"]) if cfg["export"] else main(cfg),
                   oom="lower --batch-size (or --hidden), or add --recompute 32",
                   interrupted="interrupted: continue from --out's last checkpoint with the same command plus --resume")
