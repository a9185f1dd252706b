"""Puri et al. 2018's study at our scale: model size, learning-rate rules at growing batch, precision.

This file is the study's design: which runs make which table (`plan`, the tables as lists of runs) and the
tables themselves (`tables`: their columns as data, one builder). tools/experiment_runs.py runs the plan: each
run a train.py subprocess (one at a time) on IMDB's unlabelled + training reviews (never its test reviews),
evaluated on held-out text (this file's --bpc mode) and transferred to sentiment with transfer.py; finished
runs are skipped, so rerunning the same command resumes an interrupted sweep. The tables (results.md),
results.json and lr_rules.png (the loss curves) go to --out; every number in a table sits next to the commands
that produced it.

    # the CPU-scale tables (tiny models: 28 min on one thread of a shared 2-core machine)
    OMP_NUM_THREADS=1 python tools/experiments.py --scale cpu
    OMP_NUM_THREADS=1 python tools/experiments.py --scale cpu --only lr             # one experiment
    python tools/experiments.py --scale cpu --dry-run                               # print the train.py commands only
    # the GPU scale: same script, bigger flags, train.py --cuda-graph --triton in every run (measure one run
    # first, then size --chars to the time left)
    python tools/experiments.py --scale gpu --chars 2e8 --lr-chars 1e8
    # the held-out BPC of a checkpoint, as in the tables
    python tools/experiments.py --bpc out/experiments/runs/h128_b32_t64_none-0.002_fp32_3M/ckpt.pt

Experiments (flags; `--scale` fills in the ones not given):
  size       --hidden-sizes at --size-batch, one --chars budget; BPC, SST-2 / IMDB accuracy (all units, neuron).
  lr         --rules (RULE:BASE_LR, train.py's --lr-rule none|linear|sqrt, base lr at batch 128) x --batches
             at --lr-hidden, one --lr-chars budget (the same epochs); 'Div' when train.py detects divergence.
  precision  --dtypes at --precision-hidden, --size-batch and --chars: BPC and wall time.
Runs with identical settings are shared: a size run at hidden --precision-hidden is precision's --train-dtype
row (fp32 at --scale cpu, bf16 at --scale gpu), and at batch 128 the rules with one base lr are one run.

Held-out BPC: the checkpoint's fp32 weights on the corpus' test split, --eval-rows streams x --eval-windows
windows of --eval-seq bytes, state carried: the same text for every run (train.py's own val/test BPC reads
batch-size rows, so it differs with the batch; it is kept in results.json).
Transfer: transfer.py on SST-2 (--sst2-dir) and IMDB (--imdb-dir; --imdb-limit texts per split). Its
bag-of-words baseline does not depend on the checkpoint and costs more than the rest of the transfer on CPU:
it is computed once per task (the first transfer) and the other transfers skip it (--bow-vocab 0).
"""
import argparse
import json
import math
import os
import sys
import time
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: runs start there
sys.path.insert(0, ROOT)  # its modules

import torch

import data
import fp16
import train
from plumbing import cli
from tools import experiment_runs as runner
from tools.experiment_runs import command, load_json, omp_threads, rel, task_tag, write_json

SCALES = {
    # sizes measured on a shared 2-core CPU with one thread: hidden 64/128/256 at batch 32 x 64 take about
    # 23/44/130 ms a step.
    "cpu": dict(hidden_sizes="64,128,256", size_batch=32, seq_len=64, chars=3e6, size_lr="none:2e-3",
                lr_hidden=128, batches="16,64,256", lr_chars=1.5e6,
                rules="linear:5e-4,sqrt:5e-4,none:5e-4,none:3e-3", dtypes="fp32,bf16,fp16", precision_hidden=128,
                train_dtype="fp32", sst2_limit=0, imdb_limit=1000, device="cpu", threads=1, cuda_graph="off",
                triton="off", eval_rows=16, eval_seq=256, eval_windows=32),
    # a starting point for one GPU: measure one run, then set --chars / --lr-chars to the time there is.
    "gpu": dict(hidden_sizes="1024,2048,4096", size_batch=128, seq_len=256, chars=1e8, size_lr="none:5e-4",
                lr_hidden=1024, batches="128,512,2048", lr_chars=1e8,
                rules="linear:5e-4,sqrt:5e-4,none:5e-4,none:3e-3", dtypes="fp32,fp16,bf16", precision_hidden=2048,
                train_dtype="bf16", sst2_limit=0, imdb_limit=0, device="cuda", threads=0, cuda_graph="on",
                triton="on", eval_rows=64, eval_seq=256, eval_windows=64),
}
RULE_NAMES = {"none": "fixed", "linear": "linear", "sqrt": "sqrt"}


def csv_list(s, kind=str):
    return [kind(x) for x in str(s).split(",") if x.strip()]


def positive_ints(s):
    """'64,128' -> [64, 128]; ValueError unless there are some and all are integers >= 1."""
    try:
        out = csv_list(s, int)
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise ValueError("expected comma-separated integers >= 1")
    return out


def dtype_list(s):
    out = csv_list(s)
    if not out or set(out) - set(fp16.DTYPES):
        raise ValueError(f"expected comma-separated dtypes among {', '.join(fp16.DTYPES)}")
    return out


def rules_list(s):
    """'RULE:LR,...' -> [(rule, lr)]; ValueError unless there are some, each with a known RULE and an LR > 0."""
    out = []
    for item in csv_list(s):
        rule, _, lr = item.partition(":")
        try:
            ok = rule in RULE_NAMES and 0 < float(lr) < math.inf
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"item {item!r}: expected RULE:LR with RULE in none|linear|sqrt and LR > 0")
        out.append((rule, float(lr)))
    if not out:
        raise ValueError("expected RULE:LR items")
    return out


def rule_label(rule, lr):
    return f"fixed {lr:g}" if rule == "none" else f"{rule} ({lr:g} at 128)"


def mchars(n):
    return f"{n / 1e6:g}M"


# ---------------------------------------------------------------- the plan: which runs make which table


class Run:
    """One training configuration, its folder, its commands and the experiments it serves."""

    def __init__(self, a, hidden, batch, chars, rule, lr, dtype):
        self.hidden, self.batch, self.seq, self.chars = hidden, batch, a.seq_len, chars
        self.rule, self.lr, self.dtype = rule, lr, dtype
        self.name = f"h{hidden}_b{batch}_t{a.seq_len}_{rule}-{lr:g}_{dtype}_{mchars(chars)}"
        self.dir = os.path.join(a.out, "runs", self.name)
        self.iters = max(1, round(chars / (batch * a.seq_len)))
        log_every = max(1, self.iters // a.points)
        self.argv = ["train.py", "--data", a.data, "--cache-dir", a.cache_dir, "--out", rel(self.dir),
                     "--hidden", hidden, "--batch-size", batch, "--seq-len", a.seq_len, "--iters", self.iters,
                     "--lr", f"{lr:g}", "--lr-rule", rule, "--dtype", dtype, "--device", a.device, "--seed", a.seed,
                     "--log-every", log_every, "--save-every", log_every * (self.iters // log_every + 1),
                     "--eval-every", self.iters, "--eval-iters", max(1, 2**16 // (batch * a.seq_len)),
                     "--sample-chars", 0]
        self.argv += (["--cuda-graph"] if a.cuda_graph else []) + (["--triton"] if a.triton else [])
        if a.nproc > 1:
            self.argv = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}", *self.argv]
        self.ckpt = os.path.join(self.dir, "ckpt.pt")
        self.tasks = []  # transfer tasks wanted by the experiments using this run
        self.rules = []  # the lr experiment's (RULE, BASE_LR) items this run stands for

    def peak_lr(self):
        return train.scaled_lr(self.lr, self.rule, self.batch)


def plan(a):
    """{experiment: [Run]} for the experiments in --only, each table's runs as data: (hidden, batch, characters,
    rule, base lr, dtype, transfer tasks). Identical configurations are one Run; at batch 128 every rule is its
    base lr, so the rules with one base lr are one run there."""
    rule, lr = a.size_lr
    tables = {"size": [(h, a.size_batch, a.chars, rule, lr, a.train_dtype, a.size_tasks) for h in a.hidden_sizes],
              # rules x batches: lr_grid reads them back in this order
              "lr": [(a.lr_hidden, b, a.lr_chars, r, l, a.train_dtype, a.lr_tasks)
                     for r, l in a.rules for b in a.batches],
              "precision": [(a.precision_hidden, a.size_batch, a.chars, rule, lr, d, []) for d in a.dtypes]}
    runs, exps = {}, {}
    for exp in a.only:
        for hidden, batch, chars, r, l, dtype, tasks in tables[exp]:
            run = Run(a, hidden, batch, chars, "none" if train.scaled_lr(l, r, batch) == l else r, l, dtype)
            run = runs.setdefault(run.name, run)
            run.tasks += [t for t in tasks if t not in run.tasks]
            run.rules += [(r, l)] if exp == "lr" else []
            exps.setdefault(exp, []).append(run)
    return runs, exps


def lr_grid(a, exps):
    """{(RULE, BASE_LR, batch): Run} of the lr experiment, from plan's order (rules x batches)."""
    return dict(zip([(rule, lr, b) for rule, lr in a.rules for b in a.batches], exps["lr"]))


# ---------------------------------------------------------------- the tables: columns as data, one builder


def f3(x):
    return "–" if x is None else f"{x:.3f}"


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def bpc_cell(rec, key="heldout_bpc"):
    return f"**Div** (step {rec['diverged_step']})" if rec["status"] == "div" else \
        "failed" if rec["status"] != "ok" else f3(rec[key])


def acc_cell(rec, tag):
    t = rec["transfer"].get(tag)
    if rec["status"] == "div":
        return "Div"
    return "–" if not t else f"{pct(t['test_acc'])} / {pct(t['neuron_test_acc'])}"


def tag_title(tag):
    task, _, limit = tag.partition("-l")
    return {"sst2": "SST-2", "imdb": "IMDB"}[task] + (f" (≤{limit}/split)" if limit else "")


def md_row(cells):
    return "| " + " | ".join(map(str, cells)) + " |"


def md_table(columns, items):
    """A Markdown table, one row per item: columns = [(title, right-aligned, cell(item))]."""
    return [md_row([title for title, _, _ in columns]), "|" + "".join("---:|" if right else "---|"
                                                                       for _, right, _ in columns),
            *(md_row([cell(x) for _, _, cell in columns]) for x in items)]


def columns(tags, first, commands=None, last=()):
    """The columns the run tables share: `first`, steps, the BPCs, the accuracies of `tags`, wall s, `last`, the
    commands (those named in `commands`, or all)."""
    return [*first, ("steps", 1, lambda x: x["iters"]), ("train BPC (last log)", 1, lambda x: bpc_cell(x, "train_bpc")),
            ("held-out BPC", 1, bpc_cell), *((f"{tag_title(t)} all / neuron", 1, lambda x, t=t: acc_cell(x, t))
                                              for t in tags),
            ("wall s", 1, lambda x: f"{x['train_wall_s'] or 0:.0f}"), *last,
            ("commands", 0, lambda x: "<br>".join(f"`{c}`" for k, c in x["commands"].items()
                                                 if commands is None or k in commands))]


def notes(a, tags, runs):
    """The baselines of `tags` and a warning when the runs were trained by different versions of the code."""
    lines = []
    for tag in tags:
        if b := load_json(os.path.join(a.out, f"baseline-{tag}.json")):
            lines.append(f"- {tag_title(tag)} bag-of-words baseline (transfer.py's, {b['bow_vocab']} words + L1, "
                         f"same splits): test {pct(b['baseline']['test_acc'])}%, from `{b['command']}`")
    if len({json.dumps(x["code"], sort_keys=True) for x in runs}) > 1:
        lines.append(f"Note: these runs were trained by {len({json.dumps(x['code'], sort_keys=True) for x in runs})} "
                     f"versions of the code (files edited during the sweep; sha1 prefixes per run in results.json "
                     f"`code`, none: not recorded).")
    return lines


def tables(a, exps, recs, meta):
    what = "IMDB's unlabelled + training reviews (never its test reviews), " if "aclImdb" in a.data else ""
    shapes = "; ".join(sorted({x["heldout_shape"] for x in recs.values() if x["heldout_shape"]})) or "no run evaluated"
    epochs = lambda chars: f"{chars / meta['train_bytes']:.3f} epochs"  # noqa: E731
    md = [f"# Experiments ({a.scale} scale)", "",
          f"Corpus: {what}`{a.data}`, prepared into `{meta['corpus']}`: train {meta['train_bytes'] / 1e6:.1f} MB, "
          f"held-out test split {meta['test_bytes'] / 1e6:.2f} MB. Device {a.device}, {omp_threads(a) or 'default'} "
          f"thread(s), torch {meta['torch']}. Held-out BPC: `tools/experiments.py --bpc` (fp32 weights, test split, "
          f"{shapes}, the same text for every run). Transfer: `transfer.py`, test accuracy in % of the L1 logistic "
          f"regression on all cell units / of the single sentiment neuron. Chance is 50%.", ""]
    if "size" in exps:
        runs, tags = [recs[r.name] for r in exps["size"]], [task_tag(a, t) for t in a.size_tasks]
        first = (("hidden", 1, lambda x: x["hidden"]), ("params", 1, lambda x: f"{(x['params'] or 0) / 1e6:.3f}M"))
        md += ["## 1. Model size", "", f"Same budget for every size: {mchars(a.chars)} characters "
               f"({epochs(a.chars)}), batch {a.size_batch} x {a.seq_len}, lr {rule_label(*a.size_lr)}, "
               f"{a.train_dtype}.", "", *md_table(columns(tags, first), runs), "", *notes(a, tags, runs), ""]
    if "lr" in exps:
        shared = list(dict.fromkeys(exps["lr"]))  # each training run once
        runs, tags, grid = [recs[r.name] for r in shared], [task_tag(a, t) for t in a.lr_tasks], lr_grid(a, exps)

        def cell(rule, lr, b):  # the summary's: held-out BPC, and the first task's accuracy
            x = recs[grid[rule, lr, b].name]
            t = x["transfer"].get(tags[0]) if tags and x["status"] == "ok" else None
            return bpc_cell(x) + (f" / {pct(t['test_acc'])}" if t else "")
        summary = [("rule", 0, lambda rl: rule_label(*rl)),
                   *((f"batch {b}", 1, lambda rl, b=b: cell(*rl, b)) for b in a.batches)]
        first = (("batch", 1, lambda x: x["batch"]),
                 ("rule", 0, lambda x: " = ".join(rule_label(*k) for k in dict.fromkeys(x["rules"]))),
                 ("peak lr", 1, lambda x: f"{x['peak_lr']:.3g}"))
        detail = [dict(recs[r.name], rules=r.rules) for r in sorted(shared, key=lambda r: (r.batch,
                                                                                         a.rules.index(r.rules[0])))]
        md += ["## 2. Learning-rate rules at growing batch", "",
               f"Hidden {a.lr_hidden}, sequence {a.seq_len}, the same {mchars(a.lr_chars)} characters "
               f"({epochs(a.lr_chars)}) at every batch, {a.train_dtype}, linear decay to 0, no warmup, clip 1. The "
               f"base lr is the rate at batch 128 (train.py `--lr`), scaled by `--lr-rule`. Cells: held-out BPC"
               + (f" / {tag_title(tags[0])} accuracy all units" if tags else "")
               + "; **Div**: train.py stopped the run as diverged. Commands in the detail table below.", "",
               *md_table(summary, a.rules), "", *md_table(columns(tags, first), detail), "",
               *notes(a, tags, runs), "", meta.get("plot_note", ""), ""]
    if "precision" in exps:
        runs = [recs[r.name] for r in exps["precision"]]
        speed = (("chars/s", 1, lambda x: f"{(x['chars_per_s'] or 0):,.0f}"),)
        table = md_table(columns([], (("dtype", 0, lambda x: x["dtype"]),), ("train", "bpc"), speed), runs)
        md += ["## 3. Precision", "",
               f"Hidden {a.precision_hidden}, batch {a.size_batch} x {a.seq_len}, {mchars(a.chars)} characters, "
               f"lr {rule_label(*a.size_lr)}; fp16/bf16: half-precision compute with fp32 master weights (fp16.py), "
               f"fp16 with dynamic loss scaling. Wall: the train.py process, start to end; chars/s: median over the "
               f"log intervals.", "", *table, "", *notes(a, [], runs), ""]
    return "\n".join(md) + "\n"


def plot_lr(a, exps, recs, path):
    """lr_rules.png: training BPC against characters seen, one panel per batch, one line per rule."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(lr_rules.png skipped: matplotlib is not installed; `pip install matplotlib` to draw it)"
    fig, axes = plt.subplots(1, len(a.batches), figsize=(4.2 * len(a.batches), 3.6), sharey=True, squeeze=False)
    top, grid = 0.0, lr_grid(a, exps)
    for ax, b in zip(axes[0], a.batches):
        for rule, lr in a.rules:
            x = recs[grid[rule, lr, b].name]
            c = x["curve"]
            label = rule_label(rule, lr) + (" (Div)" if x["status"] == "div" else "")
            if c:
                xs, ys = [s * b * a.seq_len / 1e6 for s, _, _ in c], [y for _, y, _ in c]
                (line,) = ax.plot(xs, ys, label=label)
                top = max(top, max(ys[1:] or ys))
                if x["status"] == "div":
                    ax.plot(xs[-1], ys[-1], "x", color=line.get_color(), markersize=10, mew=2)
            else:
                ax.plot([], [], label=label)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("characters seen (M)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training BPC (log-interval mean)")
    axes[0][0].set_ylim(top=min(top * 1.05, 8.5) if top else None)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"Learning-rate rules, hidden {a.lr_hidden}, {mchars(a.lr_chars)} characters per run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![loss curves]({os.path.basename(path)}) (`{path}`: training BPC per log interval; x: a diverged run)"


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Puri et al. 2018's size / lr-rule / precision study (docstring).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=list(SCALES), default="cpu", help="preset for the flags not given")
    p.add_argument("--only", default="size,lr,precision", help="experiments to run: size,lr,precision")
    p.add_argument("--out", default="out/experiments", help="runs, results.md, results.json, lr_rules.png")
    p.add_argument("--data", default="../shared/data/imdb/aclImdb_v1.tar.xz", help="train.py --data")
    p.add_argument("--cache-dir", help="train.py --cache-dir (default OUT/prepared)")
    p.add_argument("--sst2-dir", default="../shared/data/sst2")
    p.add_argument("--imdb-dir", default="../shared/data/imdb")
    p.add_argument("--hidden-sizes", help="size: hidden sizes, comma-separated")
    p.add_argument("--size-batch", type=int, help="size and precision: global batch")
    p.add_argument("--seq-len", type=int, help="all runs: truncated-BPTT window")
    p.add_argument("--chars", type=float, help="size and precision: training characters per run")
    p.add_argument("--size-lr", help="size and precision: RULE:LR")
    p.add_argument("--size-tasks", default="sst2,imdb", help="size: transfer tasks (sst2,imdb or empty)")
    p.add_argument("--lr-hidden", type=int, help="lr: hidden size")
    p.add_argument("--batches", help="lr: global batches, comma-separated")
    p.add_argument("--lr-chars", type=float, help="lr: training characters per run (the same epochs)")
    p.add_argument("--rules", help="lr: RULE:BASE_LR items, RULE in none|linear|sqrt")
    p.add_argument("--lr-tasks", default="sst2", help="lr: transfer tasks")
    p.add_argument("--dtypes", help="precision: dtypes compared")
    p.add_argument("--precision-hidden", type=int, help="precision: hidden size")
    p.add_argument("--train-dtype", choices=list(fp16.DTYPES), help="size and lr: training dtype")
    p.add_argument("--sst2-limit", type=int, help="transfer.py --limit for SST-2 (0: all)")
    p.add_argument("--imdb-limit", type=int, help="transfer.py --limit for IMDB (0: all)")
    p.add_argument("--device", help="train.py / transfer.py --device")
    p.add_argument("--cuda-graph", choices=("on", "off"), help="train.py --cuda-graph in every run (on: CUDA only; "
                   "default: the scale's, off on a CPU or with --nproc > 1, where it has not run)")
    p.add_argument("--triton", choices=("on", "off"), help="train.py --triton in every run (on: CUDA only; "
                   "default: as --cuda-graph)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every run (0: leave as is)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun) for the GPU scale")
    p.add_argument("--seed", type=int, default=1, help="train.py --seed")
    p.add_argument("--points", type=int, default=60, help="log events per run (the curves' resolution)")
    p.add_argument("--eval-rows", type=int, help="held-out BPC: streams of the test split (fewer if it is small)")
    p.add_argument("--eval-seq", type=int, help="held-out BPC: bytes per window")
    p.add_argument("--eval-windows", type=int, help="held-out BPC: consecutive windows per stream, state carried")
    p.add_argument("--dry-run", action="store_true",
                   help="print the train.py commands of the plan, run nothing (the held-out BPC and transfer "
                        "commands depend on the runs: they are in results.md)")
    p.add_argument("--bpc", metavar="CKPT", help="only print the held-out BPC of this checkpoint (JSON)")
    a = p.parse_args(argv)
    given = {k for k in ("cuda_graph", "triton") if getattr(a, k) is not None}
    for k, v in SCALES[a.scale].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    for k in {"cuda_graph", "triton"} - given:  # the fast paths are tested on one GPU only: not by default elsewhere
        if not a.device.startswith("cuda") or a.nproc > 1:
            setattr(a, k, "off")
    a.only = csv_list(a.only)
    a.cuda_graph, a.triton = a.cuda_graph == "on", a.triton == "on"
    for flag, on in (("--cuda-graph", a.cuda_graph), ("--triton", a.triton)):
        if on and not a.device.startswith("cuda"):
            p.error(f"{flag} on needs --device cuda, not {a.device}")
    bad = set(a.only) - {"size", "lr", "precision"}
    if bad:
        p.error(f"--only: unknown experiment(s) {sorted(bad)} (size, lr, precision)")
    # checked here, so that a bad value is one line naming its flag, not a traceback from inside the sweep
    lowest = dict.fromkeys(["--size-batch", "--seq-len", "--chars", "--lr-hidden", "--lr-chars", "--precision-hidden",
                            "--nproc", "--points", "--eval-rows", "--eval-seq", "--eval-windows"], 1)
    lowest.update(dict.fromkeys(["--threads", "--sst2-limit", "--imdb-limit"], 0))
    for flag, low in lowest.items():
        v = getattr(a, flag[2:].replace("-", "_"))
        if not low <= v < math.inf:
            p.error(f"{flag} {v:g}: expected a number >= {low}")

    def parsed(flag, parse):
        value = getattr(a, flag[2:].replace("-", "_"))
        try:
            return parse(value)
        except ValueError as e:
            p.error(f"{flag} {value!r}: {e}")

    a.hidden_sizes, a.batches = parsed("--hidden-sizes", positive_ints), parsed("--batches", positive_ints)
    a.rules, a.size_lr = parsed("--rules", rules_list), parsed("--size-lr", rules_list)
    a.dtypes = parsed("--dtypes", dtype_list)
    if len(a.size_lr) != 1:
        p.error(f"--size-lr: expected one RULE:LR item, not {len(a.size_lr)}")
    a.size_lr = a.size_lr[0]
    a.size_tasks, a.lr_tasks = csv_list(a.size_tasks), csv_list(a.lr_tasks)
    for t in a.size_tasks + a.lr_tasks:
        if t not in ("sst2", "imdb"):
            p.error(f"unknown transfer task {t!r} (sst2, imdb)")
    a.out = rel(a.out)
    a.cache_dir = rel(a.cache_dir) if a.cache_dir else os.path.join(a.out, "prepared")  # a.out: already rel
    a.data, a.sst2_dir, a.imdb_dir = rel(a.data), rel(a.sst2_dir), rel(a.imdb_dir)
    a.bpc = a.bpc and rel(a.bpc)
    return a


def main(argv=None):
    a = parse_args(argv)
    if not a.dry_run and (why := cli.device_problem(a.device)):  # a dry run may plan for another machine
        raise SystemExit(f"error: {why}")
    os.chdir(ROOT)  # paths (ours and the checkpoints' configs) are relative to the repo root
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.bpc:
        progress = partial(print, file=sys.stderr, flush=True)  # stdout: the JSON line alone
        print(json.dumps(runner.heldout_bpc(a.bpc, a.eval_rows, a.eval_seq, a.eval_windows, device=a.device,
                                            log=progress)))
        return None
    runs, exps = plan(a)
    if a.dry_run:
        for exp, rs in exps.items():
            print(f"# {exp}")
            for r in dict.fromkeys(rs):  # a run shared by rules once
                print(command(r.argv, a))
        return None
    t_start = time.time()
    corpus = data.resolve(a.data, a.cache_dir)  # train.py's defaults: the folder each run finds in the cache
    corpus_meta = load_json(os.path.join(corpus, "meta.json"))
    a.train_bytes = corpus_meta["bytes"]["train"]
    meta = dict(corpus=rel(corpus), train_bytes=a.train_bytes, test_bytes=corpus_meta["bytes"]["test"],
                torch=torch.__version__)
    os.makedirs(a.out, exist_ok=True)
    status = {name: runner.train_run(r, a) for name, r in runs.items()}  # all training first, then evaluation
    recs = {}
    for name, r in runs.items():
        ok = status[name]["status"] == "ok"
        heldout = runner.eval_run(r, a) if ok else None
        transfers = {task_tag(a, t): runner.transfer_run(r, t, a) for t in (r.tasks if ok else [])}
        recs[name] = runner.collect(r, a, status[name], heldout, transfers)
    if "lr" in exps:
        meta["plot_note"] = plot_lr(a, exps, recs, os.path.join(a.out, "lr_rules.png"))
    wall = time.time() - t_start
    # the compute behind the tables, summed from the runs' records (also right after a resumed sweep)
    compute = sum(s.get("wall_s", 0) for s in status.values())
    for r in runs.values():
        compute += (load_json(os.path.join(r.dir, "heldout.json")) or {}).get("wall_s", 0)
        for t in r.tasks:
            compute += (load_json(os.path.join(r.dir, task_tag(a, t) + ".cmd.json")) or {}).get("wall_s", 0)
    meta.update(invocation_wall_s=round(wall, 1), compute_wall_s=round(compute, 1))
    md = tables(a, exps, recs, meta)
    md += (f"\nSweep: {len(runs)} training runs; compute {compute / 60:.1f} min (train + held-out BPC + transfer, "
           f"summed over the runs), this invocation {wall / 60:.1f} min. Command: "
           f"`{command(['tools/experiments.py', *(argv if argv is not None else sys.argv[1:])], a)}`\n")
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    write_json(os.path.join(a.out, "results.json"),
               dict(meta=meta, args={k: v for k, v in vars(a).items()},
                    experiments={e: [r.name for r in rs] for e, rs in exps.items()}, runs=recs))
    print(f"wrote {a.out}/results.md, results.json" + (", lr_rules.png" if "lr" in exps and
          os.path.isfile(os.path.join(a.out, "lr_rules.png")) else "") + f" ({wall / 60:.1f} min)")
    return dict(meta=meta, runs=recs, experiments=exps, markdown=md)


if __name__ == "__main__":
    cli.main_guard(main)
