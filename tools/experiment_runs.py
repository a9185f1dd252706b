"""Running the training configurations of tools/experiments.py, one at a time and resumably.

Each run is a train.py subprocess in its own folder (runs/NAME under --out), its held-out BPC (`heldout_bpc`,
also `tools/experiments.py --bpc CKPT`) and its transfer.py runs, each result kept as JSON beside it with the
command that made it: a finished run, evaluation or transfer with the same command is read back, not redone; a
finished run of another command is moved aside (runs/NAME.replaced-DATE), never deleted. `collect` gathers a
run's record for the tables.
"""
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: runs start there
sys.path.insert(0, ROOT)  # its modules

import data
import train
from plumbing.checkpoints import load_pretrained


def rel(path):
    """The path as the commands (run in the repo root) name it: relative to the root when it lies inside the
    root or was given relative (the defaults' ../shared/...), else absolute (a temporary folder: it then means
    the same from any working directory)."""
    full = os.path.abspath(path)
    try:
        r = os.path.relpath(full, ROOT)
    except ValueError:  # another Windows drive
        return full
    inside = r != os.pardir and not r.startswith(os.pardir + os.sep)
    return r if inside or not os.path.isabs(path) else full


def omp_threads(a):
    """The OMP_NUM_THREADS the runs see: --threads, else the one inherited (None: torch's default)."""
    return str(a.threads) if a.threads else os.environ.get("OMP_NUM_THREADS")


def command(argv, a):
    env = f"OMP_NUM_THREADS={omp_threads(a)} " if omp_threads(a) else ""
    return env + shlex.join(["python", *map(str, argv)])


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def code_version():
    """sha1 prefixes of the files a run executes: another edit of them mid-sweep shows up in the tables."""
    out = {}
    for name in ("mlstm.py", "train.py", "fp16.py", "data.py", "distributed.py", "fast/loop.py",
                 "fast/kernels.py"):
        with open(os.path.join(ROOT, name), "rb") as f:
            out[name] = hashlib.sha1(f.read()).hexdigest()[:10]
    return out


def read_metrics(path):
    events = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
    return events


def heldout_bpc(checkpoint, rows=16, seq=256, windows=32, split="test", device="cpu", log=lambda *_: None):
    """BPC of a train.py checkpoint (fp32) on `rows` streams x `windows` windows of `seq` bytes of its corpus'
    `split`, state carried (train.evaluate). Fewer rows when the split is small; the corpus is prepared first
    if its cache is gone (log: its progress). -> dict(bpc, chars, ...)."""
    model, cfg = load_pretrained(checkpoint, device)
    try:
        where = [cfg[k] for k in ("data", "cache_dir", "text_field", "val_frac", "test_frac")]
    except KeyError as e:
        raise SystemExit(f"error: {checkpoint}: its config has no {e}: not from train.py") from None
    corpus = data.resolve(*where, log=log)
    path = os.path.join(corpus, split + ".bin")
    rows = min(rows, os.path.getsize(path) // (seq + 1))
    if rows < 1:
        raise SystemExit(f"error: {path} is too small for one window of {seq + 1} bytes; lower --eval-seq")
    loader = data.ByteLoader(path, rows, seq)
    n = min(windows, loader.steps_per_epoch)
    bpc = train.evaluate(model.float().eval(), loader, n, device)
    return dict(bpc=bpc, chars=rows * n * seq, rows=rows, seq=seq, windows=n, split=split,
                params=sum(p.numel() for p in model.parameters()))


def subprocess_env(a):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if a.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = omp_threads(a)
    return env


def run_logged(argv, log_path, a):
    """python ARGV in the repo root, its output to log_path. -> (exit code, wall seconds, the output)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=subprocess_env(a),
                           stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    with open(log_path, errors="replace") as f:
        return p.returncode, wall, f.read()


def same_argv(x, y):
    """Equal command lines, paths compared by the file they name (../shared/d and /work/shared/d are one)."""
    def norm(v):
        return os.path.realpath(v) if os.path.exists(v) else v
    return len(x) == len(y) and all(norm(str(p)) == norm(str(q)) for p, q in zip(x, y))


def train_run(r, a):
    """Train r unless its run.json says it finished (ok or diverged) with the same argv (paths compared by what
    they name) and thread count (the wall time and chars/s depend on it); a finished run of another command is
    moved aside, never deleted. -> run.json's dict, with the command as run."""
    done = os.path.join(r.dir, "run.json")
    got = load_json(done)
    if got and got.get("threads") == omp_threads(a) and same_argv(got.get("argv", []), r.argv):
        return got
    if got:  # finished under another command: kept, not deleted
        aside = f"{r.dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(r.dir, aside)
        print(f"train {r.name}: its finished run had another command ({got.get('command')}); moved to {aside}",
              flush=True)
    shutil.rmtree(r.dir, ignore_errors=True)  # an interrupted run: start afresh
    os.makedirs(r.dir)
    print(f"train {r.name}: {r.iters} steps ...", flush=True)
    code = code_version()
    rc, wall, text = run_logged(r.argv, os.path.join(r.dir, "train.log"), a)
    div = re.search(r"error: training diverged at step (\d+) \(loss ([^,]+),", text)
    res = dict(argv=[str(x) for x in r.argv], threads=omp_threads(a), command=command(r.argv, a), rc=rc,
               wall_s=round(wall, 2), status="ok" if rc == 0 else "div" if div else "failed", code=code)
    if div:
        res.update(diverged_step=int(div.group(1)), diverged_loss=div.group(2))
    print(f"train {r.name}: {res['status']} in {wall:.0f}s" + (f" (diverged at step {div.group(1)})" if div else ""),
          flush=True)
    if res["status"] == "failed":  # not recorded as finished: a rerun tries again
        print("  " + "\n  ".join(text.strip().splitlines()[-8:]), file=sys.stderr, flush=True)
        return res
    write_json(done, res)
    return res


def eval_run(r, a):
    """r's held-out BPC, unless its heldout.json was asked with the same settings. -> heldout.json's dict, with
    the command of the evaluation as run (heldout_bpc lowers rows and windows to what the test split holds)."""
    path = os.path.join(r.dir, "heldout.json")
    want = dict(rows=a.eval_rows, seq=a.eval_seq, windows=a.eval_windows, split="test", device=a.device)
    got = load_json(path)
    if got is None or got.get("requested") != want:
        t0 = time.time()
        got = heldout_bpc(r.ckpt, **want)
        argv = ["tools/experiments.py", "--bpc", rel(r.ckpt), "--eval-rows", got["rows"], "--eval-seq", got["seq"],
                "--eval-windows", got["windows"], "--device", a.device]
        got.update(requested=want, command=command(argv, a), wall_s=round(time.time() - t0, 2))
        write_json(path, got)
        print(f"bpc {r.name}: {got['bpc']:.3f} on {got['chars']} held-out chars", flush=True)
    return got


def task_tag(a, task):
    """sst2, imdb, or with a --limit e.g. imdb-l1000: names a run's transfer results."""
    limit = a.sst2_limit if task == "sst2" else a.imdb_limit
    return f"{task}-l{limit}" if limit else task


def transfer_argv(r, task, a, full_baseline):
    limit, tag = a.sst2_limit if task == "sst2" else a.imdb_limit, task_tag(a, task)
    argv = ["transfer.py", "--checkpoint", rel(r.ckpt), "--task", task,
            "--data-dir", a.sst2_dir if task == "sst2" else a.imdb_dir, "--device", a.device,
            "--out", rel(os.path.join(r.dir, "transfer-" + tag)), "--json", rel(os.path.join(r.dir, tag + ".json"))]
    if limit:
        argv += ["--limit", limit]
    if not full_baseline:
        argv += ["--bow-vocab", 0]
    return argv


def transfer_run(r, task, a):
    """transfer.py on r's checkpoint, unless its JSON exists. -> (results dict or None, command)."""
    tag = task_tag(a, task)
    base_path = os.path.join(a.out, f"baseline-{tag}.json")
    result_path = os.path.join(r.dir, tag + ".json")
    old = load_json(os.path.join(r.dir, tag + ".cmd.json"))
    if old and os.path.isfile(result_path):
        return load_json(result_path), old["command"]
    full = not os.path.isfile(base_path)
    argv = transfer_argv(r, task, a, full)
    print(f"transfer {r.name} {tag} ...", flush=True)
    rc, wall, text = run_logged(argv, os.path.join(r.dir, tag + ".log"), a)
    res = load_json(result_path)
    if rc != 0 or res is None:
        tail = text.strip().splitlines()[-6:]
        print(f"transfer {r.name} {tag}: failed (rc {rc})\n  " + "\n  ".join(tail), file=sys.stderr)
        return None, command(argv, a)
    cmd = command(argv, a)
    write_json(os.path.join(r.dir, tag + ".cmd.json"), dict(command=cmd, wall_s=round(wall, 2)))
    if full:
        write_json(base_path, dict(command=cmd, baseline=res["baseline"], bow_vocab=2000, run=r.name))
    print(f"transfer {r.name} {tag}: test acc {res['test_acc']:.3f}, neuron {res['neuron_test_acc']:.3f} "
          f"({wall:.0f}s)", flush=True)
    return res, cmd


def collect(r, a, status, heldout, transfers):
    """One run's record for results.json: settings, status, curve, BPCs, transfer accuracies, commands."""
    ev = read_metrics(os.path.join(r.dir, "metrics.jsonl"))
    steps = [e for e in ev if "loss" in e]
    speeds = [e["chars_per_s"] for e in steps[1:]] or [e["chars_per_s"] for e in steps]
    rec = dict(name=r.name, hidden=r.hidden, batch=r.batch, seq_len=r.seq, chars=r.chars, iters=r.iters,
               rule=r.rule, base_lr=r.lr, peak_lr=r.peak_lr(), dtype=r.dtype,
               epochs=r.chars / a.train_bytes if a.train_bytes else None,
               status=status.get("status"), diverged_step=status.get("diverged_step"), code=status.get("code"),
               train_wall_s=status.get("wall_s"), chars_per_s=statistics.median(speeds) if speeds else None,
               train_bpc=steps[-1]["bpc"] if steps else None,
               train_val_bpc=next((e["val_bpc"] for e in reversed(ev) if "val_bpc" in e), None),
               train_test_bpc=next((e["test_bpc"] for e in reversed(ev) if "test_bpc" in e), None),
               heldout_bpc=heldout and heldout["bpc"], heldout_chars=heldout and heldout["chars"],
               heldout_shape=heldout and f"{heldout['rows']} streams x {heldout['windows']} windows x "
                                         f"{heldout['seq']} bytes",
               params=heldout and heldout["params"],
               curve=[[e["step"], e["bpc"], e["lr"]] for e in steps],
               commands={"train": status["command"]})
    if heldout:
        rec["commands"]["bpc"] = heldout["command"]
    rec["transfer"] = {}
    for tag, (res, cmd) in transfers.items():
        rec["commands"][tag] = cmd
        if res:
            rec["transfer"][tag] = {k: res[k] for k in ("test_acc", "val_acc", "neuron", "neuron_test_acc", "C",
                                                          "nonzero", "featurize")}
    return rec
