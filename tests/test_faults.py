"""Reliability under faults and bad input (issue 8): kill -9 and resume, a kill during a checkpoint write,
corrupted / foreign / code-running checkpoints, divergence, a full disk, an unwritable --out, a rank that dies
or hangs, a torchrun restart, and hostile input files. Processes that must die run as subprocesses, each
under a deadline after which it is killed: no test can hang the suite."""
import errno
import json
import math
import os
import random
import runpy
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import data
import mlstm
import train
import transfer
from plumbing import checkpoints, labeled, output_model, sources
from tools import bench, generate
from data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def corpus(tmp_path, n=400):
    rng = random.Random(0)
    words = "the movie was good bad great awful plot actor scene fun boring and but very not".split()
    path = tmp_path / "corpus.txt"
    if not path.exists():
        path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(n)))
    return str(path)


def flags(tmp_path, out, *extra):
    return ["--data", corpus(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / out),
            "--hidden", "16", "--batch-size", "4", "--seq-len", "16", "--log-every", "1", "--save-every", "2",
            "--eval-every", "1000", "--eval-iters", "2", "--sample-chars", "0", "--device", "cpu", *extra]


def run(tmp_path, out, *extra):
    train.main(train.parse_args(flags(tmp_path, out, *extra)))


def load(path):
    return torch.load(path, weights_only=True)


def same_weights(a, b):
    """Bit-identical model weights of two checkpoint files (or loaded dicts)."""
    a, b = (load(x) if isinstance(x, (str, os.PathLike)) else x for x in (a, b))
    return a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 8-step run (checkpoints every 2 steps): the reference every resumed run must equal."""
    tmp = tmp_path_factory.mktemp("straight")
    run(tmp, "run", "--iters", "8")
    return load(tmp / "run" / "ckpt.pt")


# --- subprocesses ------------------------------------------------------------------------------------------

# train.py as its command line runs it, with each step slowed down so that a kill lands mid-run (a step of the
# 16-unit model takes milliseconds), and its pid written to OUT/pid.RANK.ATTEMPT for the test to find it.
WRAPPER = """
import os, runpy, sys, time
sys.path.insert(0, {root!r})
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out, exist_ok=True)
attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
with open(os.path.join(out, "pid.%s.%s" % (os.environ.get("RANK", "0"), attempt)), "w") as f:
    f.write(str(os.getpid()))
import mlstm
real = mlstm.loss_fn
def slow(logits, y):
    time.sleep({step_s})
    return real(logits, y)
mlstm.loss_fn = slow
sys.argv = [os.path.join({root!r}, "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def wrapper(tmp_path, step_s=0.05):
    path = tmp_path / "slow_train.py"
    path.write_text(WRAPPER.format(root=ROOT, step_s=step_s))
    return str(path)


def last_step(out):
    """The last training step logged to OUT/metrics.jsonl (0: none yet)."""
    steps = [0]
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            for line in f:
                try:
                    steps.append(json.loads(line)["step"] if '"loss"' in line else 0)
                except ValueError:  # a line being written
                    pass
    except OSError:  # not there yet
        pass
    return max(steps)


def wait_for(what, procs, deadline_s=90):
    """Poll until what() is true; fails (after killing procs) if a process ends first or the deadline passes."""
    t0 = time.time()
    while not what():
        if any(p.poll() is not None for p in procs) or time.time() - t0 > deadline_s:
            kill(procs)
            pytest.fail(f"gave up waiting: exit codes {[p.returncode for p in procs]}")
        time.sleep(0.02)


def kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def finish(p, deadline_s):
    """p's exit code once it ends by itself, or None (and p killed) after deadline_s."""
    try:
        return p.wait(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        kill([p])
        return None


def spawn(argv, log, **env):
    return subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env=dict(os.environ, **env))


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


# --- kill -9 and resume ------------------------------------------------------------------------------------


def test_kill_9_mid_run_then_resume_is_bit_identical(tmp_path, capsys):
    iters = "60"
    run(tmp_path, "straight", "--iters", iters)
    out = str(tmp_path / "killed")
    p = spawn([PY, wrapper(tmp_path), *flags(tmp_path, "killed", "--iters", iters)], tmp_path / "killed.log")
    try:
        # A checkpoint exists once step 5 is logged (ckpt 4 is written right after step 4's line).
        wait_for(lambda: last_step(out) >= 5 and os.path.exists(os.path.join(out, "ckpt.pt")), [p])
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        kill([p])
    assert p.returncode == -signal.SIGKILL, read(tmp_path / "killed.log")
    stopped = last_step(out)
    assert stopped < int(iters), "the run ended before the kill: nothing was tested"
    run(tmp_path, "killed", "--iters", iters, "--resume")
    said = capsys.readouterr().out
    assert "resuming from" in said and f"step {iters}/{iters}" in said, said
    resumed_at = int(said.split("resuming from")[1].split("at step ")[1].split()[0])
    assert 4 <= resumed_at <= stopped, f"resumed at {resumed_at}, killed after step {stopped}"
    assert same_weights(tmp_path / "straight" / "ckpt.pt", tmp_path / "killed" / "ckpt.pt")


def test_a_second_run_into_a_folder_in_use_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "busy"
    p = spawn([PY, wrapper(tmp_path), *flags(tmp_path, "busy", "--iters", "400")], tmp_path / "busy.log")
    try:
        wait_for(lambda: os.path.exists(out / "ckpt.pt"), [p])
        config = (out / "config.json").read_text()
        with pytest.raises(SystemExit, match=f"another run is using --out {out}"):
            run(tmp_path, "busy", "--iters", "8", "--lr", "1e-3")  # a fresh run would set ckpt.pt aside
        assert p.poll() is None, "the first run ended: the refusal was not tested against a live run"
    finally:
        kill([p])
    assert (out / "config.json").read_text() == config and not list(out.glob("*.earlier*")), os.listdir(out)
    run(tmp_path, "busy", "--iters", "400", "--resume", "--stop-at", "6")  # once it has ended, the folder is free


class Killed(BaseException):
    """A kill at a chosen point, raised inside the process: nothing after it runs, no handler catches it."""


@pytest.mark.parametrize("at", [4, 8])  # mid-run, and the last checkpoint (then the final test BPC must be in)
def test_a_kill_right_after_a_checkpoint_resumes_with_every_event_of_that_step(tmp_path, monkeypatch, at):
    run(tmp_path, "straight", "--iters", "8", "--eval-every", "2")
    real = train.save_checkpoint

    def save_then_die(path, ckpt):
        real(path, ckpt)
        if ckpt["step"] == at:
            raise Killed
    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(Killed) as kept:  # its traceback, and the frames it holds, outlive the run
        run(tmp_path, "killed", "--iters", "8", "--eval-every", "2")
    monkeypatch.setattr(train, "save_checkpoint", real)
    run(tmp_path, "killed", "--iters", "8", "--eval-every", "2", "--resume")  # the lock went with the run
    del kept

    def events(out):
        with open(tmp_path / out / "metrics.jsonl") as f:
            return [(e["step"], tuple(sorted(e))) for e in map(json.loads, f)]
    want, got = events("straight"), events("killed")
    assert got == want, f"events differ after the resume: {sorted(set(want) ^ set(got))}"
    assert (at, ("step", "val_bpc")) in got and (8, ("step", "test_bpc")) in got


def truncate(path, keep=0.5):
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: int(len(raw) * keep)])


def flip_a_byte(path):
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF  # inside the tensor data: torch.load alone would read it as another weight
    with open(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("fault", ["partial tmp file", "between the renames", "truncated ckpt.pt",
                                   "bit flip in ckpt.pt"])
def test_a_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path, capsys, straight, fault):
    """save_checkpoint writes ckpt.pt.tmp, moves ckpt.pt to ckpt.prev.pt, renames the tmp file to ckpt.pt.
    A kill at each point, simulated: the files it would leave behind."""
    out = tmp_path / "a"
    run(tmp_path, "a", "--iters", "8", "--stop-at", "6")  # ckpt.pt: step 6, ckpt.prev.pt: step 4
    ckpt, prev, tmp = out / "ckpt.pt", out / "ckpt.prev.pt", out / "ckpt.pt.tmp"
    if fault == "partial tmp file":  # killed inside torch.save of step 8's checkpoint
        tmp.write_bytes(ckpt.read_bytes()[:1000])
        expect = 6
    elif fault == "between the renames":  # killed after ckpt.pt -> ckpt.prev.pt, before the tmp file -> ckpt.pt
        os.replace(ckpt, prev)
        tmp.write_bytes(prev.read_bytes())
        expect = 6
    elif fault == "truncated ckpt.pt":  # e.g. a copy or a file system that lost the end of the file
        truncate(ckpt)
        expect = 4
    else:
        flip_a_byte(ckpt)
        expect = 4
    capsys.readouterr()
    run(tmp_path, "a", "--iters", "8", "--resume", "--stop-at", "8" if expect == 6 else "6")
    said = capsys.readouterr().out
    assert f"resuming from {out / ('ckpt.pt' if fault == 'partial tmp file' else 'ckpt.prev.pt')} at step {expect}" \
        in said, said
    if expect == 4:  # a clear warning naming the bad file, moved aside so it never replaces a good one
        assert f"warning: {ckpt} is unusable" in said and (out / "ckpt.pt.corrupt").exists(), said
        assert "CRC-32 mismatch" in said or fault != "bit flip in ckpt.pt", said
        # keep the last two: after the next save, both checkpoints are good ones (6 and the 4 it resumed from)
        assert load(ckpt)["step"] == 6 and load(prev)["step"] == 4
        run(tmp_path, "a", "--iters", "8", "--resume")
    assert load(ckpt)["step"] == 8 and same_weights(load(ckpt), straight)
    assert not tmp.exists(), "the tmp file outlived the next save"


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    run(tmp_path, "a", "--iters", "4")
    truncate(tmp_path / "a" / "ckpt.pt")
    truncate(tmp_path / "a" / "ckpt.prev.pt", keep=0.0)
    with pytest.raises(SystemExit, match=r"no usable checkpoint in .*ckpt\.pt.*ckpt\.prev\.pt"):
        run(tmp_path, "a", "--iters", "4", "--resume")


def test_resume_into_a_folder_without_checkpoints_says_it_starts_at_step_0(tmp_path, capsys):
    run(tmp_path, "a", "--iters", "2", "--resume")
    out = capsys.readouterr().out
    assert f"--resume: no checkpoint in {tmp_path / 'a'} yet: starting at step 0" in out, out[-400:]


# --- foreign and code-running checkpoints -------------------------------------------------------------------


class RunsCode:
    """Unpickling this calls os.mkdir(marker): what a checkpoint file could do to a torch.load without
    weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def bad_checkpoints(tmp_path, good):
    """name -> (path, words the error must contain) for files that are not a usable checkpoint."""
    files = {}

    def put(name, fill):
        path = tmp_path / f"{name}.pt"
        fill(path)
        files[name] = str(path)

    put("truncated", lambda p: (p.write_bytes(open(good, "rb").read()), truncate(p)))
    put("garbage", lambda p: p.write_bytes(random.Random(0).randbytes(5000)))
    put("bit_flip", lambda p: (p.write_bytes(open(good, "rb").read()), flip_a_byte(p)))
    put("empty", lambda p: p.write_bytes(b""))
    put("tensor", lambda p: torch.save(torch.zeros(3), p))
    put("legacy_format", lambda p: torch.save(load(good), p, _use_new_zipfile_serialization=False))  # no CRCs
    put("runs_code", lambda p: torch.save({"config": RunsCode(str(tmp_path / "PWNED")), "model": {}}, p))
    # a train.py checkpoint of another model: the config says 16 units, the weights have 8
    ck = load(good)
    ck["model"] = mlstm.MLSTM(hidden=8, embed=64).state_dict()
    put("other_shapes", lambda p: torch.save(ck, p))
    return files


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # checkpoints.load_pretrained indexing a tensor file
def test_bad_checkpoints_are_refused_by_every_loader_and_never_run_code(tmp_path, capsys):
    run(tmp_path, "good", "--iters", "2")
    good = str(tmp_path / "good" / "ckpt.pt")
    marker = tmp_path / "PWNED"
    files = bad_checkpoints(tmp_path, good)
    rows = "label,text\n" + "".join(f"{i % 2},{'great fun' if i % 2 else 'awful bore'} {i}\n" for i in range(20))
    (tmp_path / "l.csv").write_text(rows)
    for name, path in files.items():
        with pytest.raises(SystemExit) as e:
            checkpoints.load_pretrained(path)
        assert f"{path}: not a usable mLSTM checkpoint" in str(e.value), (name, e.value)
        if name == "runs_code":
            assert "weights_only" in str(e.value) or "Unsupported global" in str(e.value), e.value
        if name == "bit_flip":  # torch.load alone would read it as a different weight
            assert "CRC-32 mismatch" in str(e.value), e.value
        if name == "legacy_format":
            assert "legacy format: torch.load it and torch.save it again" in str(e.value), e.value
        with pytest.raises(SystemExit) as e:
            generate.main(["--checkpoint", path, "--device", "cpu", "--length", "3"])
        assert path in str(e.value), (name, e.value)
        with pytest.raises(SystemExit) as e:
            transfer.run(transfer.parse_args(["--checkpoint", path, "--train", str(tmp_path / "l.csv"), "--test",
                                              str(tmp_path / "l.csv"), "--device", "cpu"]), log=lambda *a: None)
        assert path in str(e.value), (name, e.value)
        # train.py --resume: the file as OUT/ckpt.pt, no other checkpoint
        out = tmp_path / f"resume-{name}"
        out.mkdir()
        os.replace(path, out / "ckpt.pt")
        argv = flags(tmp_path, out.name, "--iters", "2", "--resume")
        with pytest.raises(SystemExit, match=rf"no usable checkpoint in {out}.*ckpt\.pt"):
            train.main(train.parse_args(argv))
        assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists(), "a checkpoint ran code"


def test_a_checkpoint_of_another_config_is_a_clear_error(tmp_path):
    """(test_train.py::test_resume_with_another_config_is_refused: --hidden; here: the ckpt.prev.pt fallen back to.)"""
    run(tmp_path, "a", "--iters", "2", "--hidden", "8")
    os.replace(tmp_path / "a" / "ckpt.pt", tmp_path / "a" / "ckpt.prev.pt")
    (tmp_path / "a" / "ckpt.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit, match=r"ckpt\.prev\.pt was trained with another configuration.*'hidden': \(8, 16\)"):
        run(tmp_path, "a", "--iters", "2", "--resume")


# --- divergence ---------------------------------------------------------------------------------------------


def test_a_huge_learning_rate_is_divergence_not_a_finished_run(tmp_path):
    """--lr 1e6 sends the loss to millions, finite: it is stopped as divergence all the same."""
    with pytest.raises(SystemExit, match=r"diverged at step (\d+)") as e:
        run(tmp_path, "a", "--iters", "40", "--lr", "1e6", "--warmup", "100000")
    at = int(str(e.value).split("diverged at step ")[1].split()[0])
    ckpt = load(tmp_path / "a" / "ckpt.pt")
    assert ckpt["step"] < at and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert f"last good checkpoint is in {tmp_path / 'a'} (step {ckpt['step']})" in str(e.value)
    with pytest.raises(SystemExit, match=r"diverged at step \d+ .*; no checkpoint was saved yet\. Lower --lr"):
        run(tmp_path, "b", "--iters", "40", "--lr", "1e9", "--save-every", "20")
    assert not (tmp_path / "b" / "ckpt.pt").exists()


def test_an_inf_loss_in_fp32_stops_the_run(tmp_path, monkeypatch):
    """(NaN: test_train.py::test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint.)"""
    real, calls = train.loss_fn, []

    def poisoned(logits, y):
        calls.append(1)
        return real(logits, y) * (math.inf if len(calls) == 5 else 1.0)

    monkeypatch.setattr(train, "loss_fn", poisoned)
    with pytest.raises(SystemExit, match=r"diverged at step 5 \(loss inf.*\(step 4\)"):
        run(tmp_path, "a", "--iters", "10")
    assert load(tmp_path / "a" / "ckpt.pt")["step"] == 4


class InfGrad(torch.autograd.Function):
    """The identity, whose gradient is inf: a finite loss whose every backward overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


@pytest.mark.parametrize("scaler, at, skipped, scale", [([], 3, 3, 1), (["--static-loss-scale"], 3, 3, 4)])
def test_fp16_loss_scale_stuck_at_its_floor_is_divergence(tmp_path, monkeypatch, scaler, at, skipped, scale):
    """Each overflow skips the step and halves the scale (test_fp16.py); a scale at its floor of 1 with no good
    step since, or a static scale with every step of a log interval skipped, is reported as divergence,
    although every loss is finite."""
    real = train.loss_fn
    monkeypatch.setattr(train, "loss_fn", lambda logits, y: InfGrad.apply(real(logits, y)))
    with pytest.raises(SystemExit, match=rf"diverged at step {at} \(loss 5\.\d+, {skipped} skipped steps, loss scale {scale}\)"):
        run(tmp_path, "a", "--iters", "10", "--dtype", "fp16", "--loss-scale", "4", "--hidden", "8",
            "--seq-len", "4", "--batch-size", "2", "--log-every", "3", "--save-every", "3", *scaler)


# --- ctrl-C, memory, a closed pipe: one line, not a traceback ----------------------------------------------


def test_ctrl_c_during_training_is_one_line_and_the_run_resumes(tmp_path, straight):
    out = tmp_path / "run"
    # preexec_fn: a terminal's ctrl-C, also when a script runs the tests in the background (`make test &` in a
    # non-interactive shell makes every child ignore SIGINT, and the run would finish uninterrupted)
    p = subprocess.Popen([PY, wrapper(tmp_path, step_s=1), *flags(tmp_path, "run", "--iters", "8")], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: os.path.exists(out / "ckpt.pt"), [p])
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=60)[1]
    finally:
        kill([p])
    assert p.returncode == 130 and "interrupted: continue from --out's last checkpoint" in err \
        and "Traceback" not in err, f"exit {p.returncode}, stderr:\n{err}"
    run(tmp_path, "run", "--iters", "8", "--resume")
    assert same_weights(out / "ckpt.pt", straight)


def test_running_out_of_memory_on_the_cpu_is_one_line(tmp_path):
    p = subprocess.run([PY, "train.py", *flags(tmp_path, "huge", "--iters", "1", "--hidden", str(10**12))], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 1 and "error: out of memory" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    row = bench.measure("ours", 10**12, 2, 4, steps=1, warmup=0)  # fails at its first allocation
    assert row["error"] == "out of memory" and row["ms_per_step"] is None, row


OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")


@pytest.mark.parametrize("script", ["transfer.py", "tools/generate.py", "classify.py"])
@pytest.mark.parametrize("fault, said", [
    (KeyboardInterrupt(), None), (OOM, "error: out of memory"), (RuntimeError("a bug"), None)])
def test_the_scripts_end_on_ctrl_c_and_out_of_memory_with_one_line(tmp_path, monkeypatch, capsys, script, fault,
                                                                     said):
    """Each script's __main__ as run from the command line, the model loader raising the fault."""
    (tmp_path / "ckpt.pt").write_bytes(b"")
    (tmp_path / "a.csv").write_text("label,text\n1,good\n0,bad\n1,fine\n0,awful\n1,great\n0,poor\n")
    argv = {"transfer.py": ["--checkpoint", str(tmp_path / "ckpt.pt"), "--train", str(tmp_path / "a.csv"), "--test",
                            str(tmp_path / "a.csv"), "--val-frac", "0.5"],
            "tools/generate.py": ["--checkpoint", str(tmp_path / "ckpt.pt")],
            "classify.py": ["--model", str(tmp_path / "ckpt.pt"), "a good film"]}[script]
    monkeypatch.setattr(sys, "argv", [script, "--device", "cpu", *argv])

    def fail(*a, **k):
        raise fault
    monkeypatch.setattr(checkpoints, "load_pretrained", fail)
    monkeypatch.setattr(output_model, "load", fail)  # classify.py's first read
    if isinstance(fault, RuntimeError) and said is None:  # not a memory error: the traceback, as for any bug
        with pytest.raises(RuntimeError, match="a bug"):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        return
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    if isinstance(fault, KeyboardInterrupt):
        err = capsys.readouterr().err
        assert e.value.code == 130 and err.startswith("interrupted") and err.count("\n") == 1, (e.value.code, err)
    else:
        assert str(e.value.code).startswith(said) and "\n" not in str(e.value.code), e.value.code


def test_generate_into_a_pipe_closed_early_stops_quietly(tmp_path):
    torch.manual_seed(0)
    train.save_checkpoint(str(tmp_path / "m.pt"), {"model": mlstm.MLSTM(hidden=16, embed=8).state_dict(),
                                                  "config": {"hidden": 16, "embed": 8, "no_weight_norm": False}})
    p = subprocess.Popen([PY, "tools/generate.py", "--checkpoint", str(tmp_path / "m.pt"), "--length", "1000000",
                          "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(5)  # as `| head -c 5` does: read a little, then close
    p.stdout.close()
    err = p.communicate(timeout=120)[1].decode()
    assert p.returncode == 1 and "Traceback" not in err, f"exit {p.returncode}, stderr:\n{err}"


# --- a full disk, an unwritable --out -----------------------------------------------------------------------


def test_an_unwritable_out_is_an_error_before_training(tmp_path):
    (tmp_path / "file").write_text("a regular file")
    for out in ("file/run", "file"):  # a path under a regular file (root ignores permissions); a file itself
        with pytest.raises(SystemExit, match=f"cannot write to --out {tmp_path / out}"):
            run(tmp_path, out, "--iters", "2")
    assert not (tmp_path / "cache").exists(), "the data was prepared before --out was checked"


def test_an_unwritable_cache_dir_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("a regular file")
    with pytest.raises(SystemExit, match=f"cannot prepare .*corpus.txt in --cache-dir {tmp_path / 'file' / 'prep'}"):
        run(tmp_path, "a", "--iters", "2", "--cache-dir", str(tmp_path / "file" / "prep"))


@pytest.mark.parametrize("failing", ["torch.save", "torch.save (RuntimeError)", "os.replace"])
def test_a_failing_checkpoint_write_leaves_the_good_one(tmp_path, monkeypatch, straight, failing):
    """The third checkpoint (step 6) fails: no space left in torch.save (half a file written), or the final rename
    fails. ckpt.pt stays byte-identical, no tmp file is left, and --resume continues to the same end."""
    out = tmp_path / "a"
    real_save, real_replace, seen = torch.save, os.replace, {}

    def save(obj, f, *a, **k):
        if str(f).endswith(".tmp") and isinstance(obj, dict) and obj.get("step") == 6 and failing != "os.replace":
            seen["ckpt"] = (out / "ckpt.pt").read_bytes()
            real_save(obj, f, *a, **k)
            truncate(f)
            if "RuntimeError" in failing:  # how torch.save reports a real full disk
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    def replace(src, dst, *a, **k):
        if str(src).endswith("ckpt.pt.tmp") and failing == "os.replace" and load(src)["step"] == 6:
            raise OSError(errno.EIO, "Input/output error")
        if str(src).endswith("ckpt.pt") and str(dst).endswith("prev.pt") and load(src)["step"] == 4:
            seen["ckpt"] = open(src, "rb").read()
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SystemExit, match=r"cannot write the checkpoint .*ckpt\.pt \((OSError: \[Errno \d+\] "
                                         r"(No space left on device|Input/output error)|RuntimeError: .*pos 64 vs 0)\)"):
        run(tmp_path, "a", "--iters", "8")
    assert (out / "ckpt.pt").read_bytes() == seen["ckpt"], "the good checkpoint changed"
    assert not (out / "ckpt.pt.tmp").exists(), "a half-written file was kept"
    monkeypatch.undo()
    run(tmp_path, "a", "--iters", "8", "--resume")
    assert same_weights(load(out / "ckpt.pt"), straight)


# --- distributed --------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_a_rank_killed_or_stopped_ends_the_other_with_a_message(tmp_path, fault):
    """Two train.py processes on gloo (no torchrun, which would end the others itself). Rank 1 is killed (its
    sockets close: rank 0 learns at once) or stopped with SIGSTOP (alive, silent: only --timeout ends the wait).
    (test_distributed.py::test_a_failing_rank_ends_the_others_with_a_message: the same from inside the rank.)"""
    out, port, script = str(tmp_path / "run"), free_port(), wrapper(tmp_path, 0.02)
    procs = [spawn([PY, script, *flags(tmp_path, "run", "--iters", "1000", "--timeout", "5")], tmp_path / f"{r}.log",
                   RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1") for r in range(2)]
    try:
        wait_for(lambda: os.path.exists(os.path.join(out, "ckpt.pt")), procs)
        procs[1].send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        code = finish(procs[0], 60)  # a hang guard only: the timeout is 5 s
    finally:
        kill(procs)
    said = read(tmp_path / "0.log")
    assert code == 1, f"rank 0: exit code {code}\n{said[-3000:]}"
    assert "error: rank 0: a collective with the other processes failed" in said and "Traceback" not in said, said
    assert ("Timed out" in said or "timeout" in said.lower()) if fault == "stopped" else "peer" in said, said
    assert load(os.path.join(out, "ckpt.pt"))["step"] >= 2


def test_torchrun_restart_resumes_from_the_last_checkpoint(tmp_path):
    """torchrun --max-restarts=1 with --resume on the command line: rank 1 killed mid-run, torchrun ends rank 0,
    starts both again, they resume from the last checkpoint and end where a 1-process run ends (to float32 sum
    order: test_distributed.py)."""
    out, iters = str(tmp_path / "run"), "30"
    run(tmp_path, "one", "--iters", iters)
    torchrun = os.path.join(os.path.dirname(PY), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.1",
           wrapper(tmp_path, 0.02), *flags(tmp_path, "run", "--iters", iters, "--timeout", "20", "--resume")]
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: torchrun otherwise keeps one store for all attempts, without a prefix
    # per attempt, and a restarted rank can read the dead attempt's addresses from it (gloo connectFullMesh:
    # Connection refused; pytorch/pytorch#167288 with NCCL). With it, each attempt gets a fresh store.
    p = spawn(cmd, tmp_path / "torchrun.log", OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    try:
        wait_for(lambda: last_step(out) >= 5 and os.path.exists(os.path.join(out, "pid.1.0")), [p])
        os.kill(int(read(os.path.join(out, "pid.1.0"))), signal.SIGKILL)
        killed_after = last_step(out)
        code = finish(p, 120)
    finally:
        kill([p])
    said = read(tmp_path / "torchrun.log")
    assert code == 0, f"torchrun: exit code {code}\n{said[-4000:]}"
    assert killed_after < int(iters), "the run ended before the kill: nothing was tested"
    assert os.path.exists(os.path.join(out, "pid.0.1")), "no restart"
    resumed_at = int(said.split("resuming from")[1].split("at step ")[1].split()[0])
    assert 4 <= resumed_at <= killed_after, said
    a, b = load(tmp_path / "one" / "ckpt.pt"), load(os.path.join(out, "ckpt.pt"))
    assert b["step"] == int(iters)
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert diff < 1e-5, f"the restarted 2-process run ends {diff} away from the 1-process run"


# --- hostile input files ------------------------------------------------------------------------------------


def prepare(path, **kw):
    logs = []
    meta = data.prepare([str(path)], str(path) + ".out", val_frac=0, test_frac=0, log=logs.append, **kw)
    with open(str(path) + ".out/train.bin", "rb") as f:
        return meta, f.read(), logs


@pytest.mark.parametrize("name,content,message", [
    ("zero.txt", b"", "zero.txt: no documents found"),
    ("zero.jsonl", b"", "zero.jsonl: no documents found"),
    ("zero.csv", b"", "zero.csv: no text column"),
    ("zero.txt.gz", b"", "zero.txt.gz: no documents found"),
    ("garbage.txt.gz", random.Random(1).randbytes(3000), "garbage.txt.gz: cannot read (BadGzipFile"),
    ("garbage.jsonl", random.Random(2).randbytes(3000), "garbage.jsonl: does not look like text (0.6% NUL bytes"),
    ("garbage.csv", random.Random(3).randbytes(3000), "garbage.csv: "),
    ("wrong_field.jsonl", b'{"text": "a review"}\n' * 3, "skipped 3 lines, e.g. "),
    # a quoted field over many lines, longer in all than sources.MAX_LINE (a field of 200,000 on one line is read)
    ("huge_field.csv", b'text\n"' + b"x\n" * (2**21 + 1) + b'"\n', "huge_field.csv:2: malformed row (field larger"),
])
def test_hostile_corpus_files_get_a_clear_error_naming_them(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as e:
        prepare(tmp_path / name)
    assert message in str(e.value), e.value
    assert not os.path.exists(str(tmp_path / name) + ".out.tmp")


def test_train_on_an_empty_corpus_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(SystemExit, match="error: .*empty.txt: no documents found"):
        train.main(train.parse_args(flags(tmp_path, "a", "--data", str(tmp_path / "empty.txt"))))
    (tmp_path / "prepared").mkdir()  # a prepared folder whose train.bin is empty
    for split in data.SPLITS:
        (tmp_path / "prepared" / f"{split}.bin").write_bytes(b"")
    (tmp_path / "prepared" / "meta.json").write_text("{}")
    with pytest.raises(SystemExit, match="error: .*train.bin: missing or empty corpus file"):
        train.main(train.parse_args(flags(tmp_path, "a", "--data", str(tmp_path / "prepared"))))


def test_binary_and_invalid_utf8_text_is_read_as_bytes_with_replacement(tmp_path):
    """A plain-text corpus is one document per line; a file that does not look like text is refused, naming it;
    with allow_binary (--allow-binary) bytes that are not UTF-8 become U+FFFD (as transfer.py reads its texts),
    a line of binary garbage is a document of such characters: nothing crashes."""
    (tmp_path / "bad.txt").write_bytes(b"good \xff\xfe movie\n\x00\x01\x80\x81 binary\r\nplain\n")
    with pytest.raises(DataError, match="bad.txt: does not look like text .*; --allow-binary reads it anyway"):
        prepare(tmp_path / "bad.txt")
    meta, train_bin, _ = prepare(tmp_path / "bad.txt", allow_binary=True)
    assert "good \ufffd\ufffd movie".encode() in train_bin and b"\x00\x01\xef\xbf\xbd" in train_bin
    assert meta["documents"]["train"] == 3 and meta["skipped"] == 0


def test_malformed_json_lines_are_skipped_and_counted(tmp_path):
    """(A line without the field: test_data.py::test_prepare_jsonl_gz_counts_lines_without_the_field.)"""
    lines = [b'{"reviewText": "kept one"}', b"[" * 100_000 + b"]" * 100_000,  # nested deeper than recursion
             b"[1, 2]", b"42", b'{"reviewText": 7}', b'{"reviewText": "bad \xff utf8"}', b'{"reviewText": "kept two"}']
    (tmp_path / "x.jsonl").write_bytes(b"\n".join(lines))
    meta, train_bin, logs = prepare(tmp_path / "x.jsonl")
    assert train_bin == b"\n kept one \n bad \xef\xbf\xbd utf8 \n kept two "
    assert meta["skipped"] == 4 and "x.jsonl:2: not a JSON object" in logs[0], logs


def test_csv_rows_with_missing_or_extra_columns(tmp_path):
    """(A missing text column: test_data.py::test_prepare_csv_and_tsv_columns.)"""
    (tmp_path / "x.csv").write_text("id,text\n1,first\n2\n3,third,extra,more\n4,\n5,fifth\n")
    meta, train_bin, logs = prepare(tmp_path / "x.csv")
    assert train_bin == b"\n first \n third \n fifth "
    assert meta["skipped"] == 2 and "x.csv:3: empty or missing 'text'" in logs[0], logs


STRAY = 'label,text\n1,good film\n0,"bad film, he said\n1,"multi\nline"\n' + "".join(f"1,review {i}\n" for i in range(50))


@pytest.mark.parametrize("name, content, line", [
    ("stray.csv", STRAY, 3),  # csv alone reads 2 rows: the quote opened on line 3 swallows the other 51
    ("stray.tsv", STRAY.replace(",", "\t"), 3),
    ("junk.csv", 'label,text\n1,"multi\nline"\n0,"quoted" then more\n', 4),
])
def test_a_stray_quote_in_a_csv_is_an_error_naming_the_row_not_a_merged_row(tmp_path, name, content, line):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=f"{name}:{line}: malformed row .*a stray quote"):
        labeled.read_labeled(str(tmp_path / name))
    with pytest.raises(DataError, match=f"{name}:{line}: malformed row .*a stray quote"):
        list(data.documents(str(tmp_path / name)))


def test_an_overlong_line_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_LINE", 100)
    long = b"y" * 1000
    (tmp_path / "x.txt").write_bytes(b"short one\n" + long + b"\nshort two\r\n" + long)
    (tmp_path / "x.jsonl").write_bytes(b'{"reviewText": "short"}\n{"reviewText": "' + long + b'"}\n')
    meta, train_bin, logs = prepare(tmp_path / "x.txt")
    assert train_bin == b"\n short one \n short two " and meta["skipped"] == 2, (train_bin, meta)
    assert "x.txt:2: line longer than 100 characters" in logs[0] and "x.txt:4" in logs[0], logs
    meta, train_bin, _ = prepare(tmp_path / "x.jsonl")
    assert train_bin == b"\n short " and meta["skipped"] == 1
    (tmp_path / "l.jsonl").write_bytes(b'{"text": "a", "label": 1}\n{"text": "' + long + b'", "label": 0}\n')
    with pytest.raises(DataError, match="l.jsonl:2: line longer than 100 characters"):
        labeled.read_labeled(str(tmp_path / "l.jsonl"))


MEASURE = """
import json, resource, sys
sys.path.insert(0, {root!r})
import data
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
meta = data.prepare([{src!r}], {out!r}, val_frac=0, test_frac=0, log=lambda *a: None)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"meta": meta, "peak_kb": after - before}}))
"""


def test_a_64_mb_single_line_costs_bounded_memory(tmp_path):
    """A file with no newline (the issue's 1 GB line, 64 MB here) is skipped and counted in pieces: the peak
    memory of preparing it grows by far less than the line (reading it whole takes several times its size)."""
    size = 64 * 2**20
    with open(tmp_path / "big.txt", "wb") as f:
        f.write(b"before\n")
        block = b"all work and no play " * 50_000
        for _ in range(size // len(block)):
            f.write(block)
        f.write(b"\nafter\n")
    script = MEASURE.format(root=ROOT, src=str(tmp_path / "big.txt"), out=str(tmp_path / "out"))
    p = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["meta"]["skipped"] == 1 and res["meta"]["documents"]["train"] == 2, res
    assert res["peak_kb"] * 1024 < size / 4, f"peak memory grew by {res['peak_kb'] / 1024:.0f} MB"


def test_transfer_hostile_labelled_files(tmp_path):
    """(Labels other than 0/1, an empty split, a missing column, a row without text: test_transfer.py::
    test_read_labeled_errors.) Here: deep JSON, binary garbage, a one-class split, extra columns."""
    cases = {"deep.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n",
             "garbage.jsonl": random.Random(4).randbytes(2000),
             "garbage.csv": random.Random(5).randbytes(2000)}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=name):
            labeled.read_labeled(str(tmp_path / name))
    (tmp_path / "extra.csv").write_text("label,text,note\n1,good,x,y\n0,bad\n")
    texts, labels = labeled.read_labeled(str(tmp_path / "extra.csv"))
    assert texts == ["good", "bad"] and labels.tolist() == [1, 0]
    run(tmp_path, "m", "--iters", "2")
    (tmp_path / "one.csv").write_text("label,text\n" + "1,good\n" * 10)
    argv = ["--checkpoint", str(tmp_path / "m" / "ckpt.pt"), "--train", str(tmp_path / "one.csv"), "--test",
            str(tmp_path / "one.csv"), "--device", "cpu"]
    with pytest.raises(DataError, match="only one class present"):
        transfer.run(transfer.parse_args(argv), log=lambda *a: None)


def test_transfer_command_line_reports_bad_labels_without_a_traceback(tmp_path):
    run(tmp_path, "m", "--iters", "2")
    (tmp_path / "bad.csv").write_text("label,text\n0,fine\n1,good\n2,what\n")
    p = subprocess.run([PY, os.path.join(ROOT, "transfer.py"), "--checkpoint", str(tmp_path / "m" / "ckpt.pt"),
                        "--train", str(tmp_path / "bad.csv"), "--test", str(tmp_path / "bad.csv"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"error: {tmp_path / 'bad.csv'}:4: label '2' is not binary" in p.stderr, p.stderr


def test_a_source_that_is_not_text_is_refused_and_leaves_nothing_behind(tmp_path):
    """random bytes and a shared library: one line naming the file, exit 1, no --out folder, no lock files;
    --allow-binary trains on them anyway."""
    (tmp_path / "random.bin").write_bytes(random.Random(0).randbytes(50_000))
    (tmp_path / "lib.so").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(200) + random.Random(1).randbytes(20_000))
    for name in ("random.bin", "lib.so"):
        argv = flags(tmp_path, "run", "--iters", "2")
        argv[1] = str(tmp_path / name)
        p = subprocess.run([PY, "train.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert f"error: {tmp_path / name}: does not look like text" in p.stderr, p.stderr
        assert "--allow-binary reads it anyway" in p.stderr, p.stderr
        left = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs]
        assert not os.path.exists(tmp_path / "run") and not any(f.endswith(".lock") for f in left), left
    run(tmp_path, "forced", "--iters", "2", "--data", str(tmp_path / "random.bin"), "--allow-binary")
    assert last_step(tmp_path / "forced") == 2


def test_a_run_refused_after_claiming_its_folder_leaves_no_folder_or_lock(tmp_path):
    (tmp_path / "tiny.txt").write_text("too short\n")  # too few bytes for the batch: refused after the claim
    argv = flags(tmp_path, "run", "--iters", "2")
    argv[1] = str(tmp_path / "tiny.txt")
    p = subprocess.run([PY, "train.py", *argv, "--val-frac", "0", "--test-frac", "0"], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 1 and "too small" in p.stderr, p.stderr
    left = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert not os.path.exists(tmp_path / "run") and not any(f.endswith(".lock") for f in left), left


def test_the_csv_column_read_is_said(tmp_path, capsys):
    rows = "".join(f'{i},"review {i} of a film, with words",1\n' for i in range(300))
    (tmp_path / "r.csv").write_text("id,review,stars\n" + rows)
    run(tmp_path, "csv", "--iters", "2", "--data", str(tmp_path / "r.csv"))
    out = capsys.readouterr().out
    assert f"the text of {tmp_path / 'r.csv'}: its column 'review'" in out, out


@pytest.mark.parametrize("argv,said", [
    (["--hidden", "-5"], "--hidden must be positive"), (["--hidden", "big"], "--hidden must be an integer or one of")])
def test_train_flag_errors_say_what_is_wrong(tmp_path, capsys, argv, said):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert said in capsys.readouterr().err


def test_help_shows_defaults_once_and_never_none():
    for script in ("train.py", "transfer.py", "finetune.py", "classify.py", "tools/generate.py"):
        text = subprocess.run([PY, script, "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        flat = " ".join(text.split())
        assert "(default: None)" not in flat and "(default: False)" not in flat, script
    flat = " ".join(subprocess.run([PY, "transfer.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    assert "the first bytes shown of each heatmap text (default: 1500)" in flat and "(default: 2000)" in flat, flat


def test_make_says_what_it_installs_before_installing(tmp_path):
    """make demo / make test with a stand-in pip: a line names the requirements before each (quiet) install."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "pip").write_text("#!/bin/sh\necho \"pip $*\"\n")
    (bin_dir / "python").write_text("#!/bin/sh\necho \"python $*\"\n")
    for f in ("pip", "python"):
        os.chmod(bin_dir / f, 0o755)
    p = subprocess.run(["make", "-B", f"VENV={tmp_path / 'venv'}", "PYTHON=true", "test"], cwd=ROOT,
                       capture_output=True, text=True)
    lines = p.stdout.splitlines()
    said = [k for k, line in enumerate(lines) if line.startswith("make: installing into")]
    pips = [k for k, line in enumerate(lines) if line.startswith("pip install")]
    assert p.returncode == 0 and len(said) == 2 and len(pips) == 2, p.stdout + p.stderr
    assert said[0] < pips[0] < said[1] < pips[1], lines
    assert "torch==2.13.0 numpy" in lines[said[0]] and "pytest scikit-learn" in lines[said[1]], lines


def test_the_bench_tests_run_without_triton():
    """Without Triton (no wheel off Linux) tests/test_bench.py leaves out the fused rows instead of failing."""
    script = ("import sys; sys.modules['triton'] = None\nimport pytest\n"
              "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_bench.py']))")
    p = subprocess.run([PY, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:]
