"""train.py: learning-rate schedule and scaling rules, a run that learns, exact resume, golden losses."""
import glob
import json
import math
import os
import random
import time

import numpy as np
import pytest
import torch

import data
import mlstm
import train
from plumbing import checkpoints


def corpus(tmp_path, n=400):
    rng = random.Random(0)
    words = "the movie was good bad great awful plot actor scene fun boring and but very not".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(n))
    path = tmp_path / "corpus.txt"
    path.write_text(text + "\n")
    return str(path)


def run(tmp_path, out, *flags):
    argv = ["--data", corpus(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / out),
            "--hidden", "16", "--batch-size", "4", "--seq-len", "16", "--log-every", "1", "--save-every", "2",
            "--eval-every", "1000", "--eval-iters", "2", "--sample-chars", "0", "--device", "cpu", *flags]
    train.main(train.parse_args(argv))
    with open(tmp_path / out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(metrics):
    return [m["loss"] for m in metrics if "loss" in m]


def test_lr_schedule_warmup_and_linear_decay():
    peak, warmup, total = 1e-3, 10, 110
    assert float(train.lr_at(0, peak, warmup, total)) == pytest.approx(1e-4)
    assert float(train.lr_at(9, peak, warmup, total)) == pytest.approx(peak)  # warmup ends at the peak
    assert float(train.lr_at(10, peak, warmup, total)) == pytest.approx(peak)
    assert float(train.lr_at(60, peak, warmup, total)) == pytest.approx(peak / 2)  # halfway through the decay
    assert float(train.lr_at(110, peak, warmup, total)) == 0.0
    assert float(train.lr_at(0, peak, 0, 100)) == pytest.approx(peak)


def test_lr_scaling_rules_from_batch_128():
    assert train.scaled_lr(5e-4, "none", 1024) == 5e-4
    assert train.scaled_lr(5e-4, "linear", 1024) == pytest.approx(4e-3)
    assert train.scaled_lr(5e-4, "sqrt", 512) == pytest.approx(1e-3)
    assert train.scaled_lr(5e-4, "sqrt", 128) == pytest.approx(5e-4)


def test_bad_flags_are_refused_with_a_message(capsys):
    for argv, msg in ((["--hidden", "huge"], "--hidden must be"), (["--batch-size", "0"], "--batch-size must be"),
                      (["--save-every", "30", "--log-every", "20"], "multiple of --log-every"),
                      (["--recompute", "-1"], "--recompute must be >= 0"),
                      (["--recompute", "8", "--cuda-graph"], "does not combine with --cuda-graph"),
                      (["--iters", "-5", "--epochs", "1"], "must be >= 0"), (["--stop-at", "-3"], "must be >= 0"),
                      (["--epochs", "-1"], "must be >= 0"), (["--loss-scale", "inf"], "--loss-scale in [1, 2^64)"),
                      (["--lr", "nan"], "--lr must be > 0"), (["--scale-growth", "0"], "--scale-growth must be >= 1"),
                      (["--device", "gpu"], "--device gpu: expected auto, cpu, cuda"),
                      (["--device", "mps"], "--device mps: expected auto, cpu, cuda"),
                      (["--device", f"cuda:{torch.cuda.device_count()}"], "no such CUDA device here"),
                      (["--epochs", "nan"], "--epochs must be >= 0 and finite"),
                      (["--epochs", "inf"], "--epochs must be >= 0 and finite"),
                      (["--iters", str(10**23)], "--iters must be >= 0 (and below 2^62)"),
                      (["--warmup", "-1"], "--warmup must be >= 0"), (["--seed", "-1"], "--seed must be >= 0"),
                      (["--sample-chars", "-5"], "--sample-chars must be >= 0"),
                      (["--bucket-mb", "nan"], "--bucket-mb must be >= 0 and finite"),
                      (["--bucket-mb", "-3"], "--bucket-mb must be >= 0 and finite"),
                      (["--timeout", "inf"], "--timeout must be > 0 and below 1e9 seconds"),
                      (["--val-frac", "1.5"], "--val-frac and --test-frac must be >= 0"),
                      (["--val-frac", "0.6", "--test-frac", "0.5"], "with a sum below 1"),
                      (["--val-frac", "1"], "--val-frac and --test-frac must be >= 0"),
                      (["--seed", str(2**62)], "--seed must be >= 0 (and below 2^62)"),
                      (["--scale-growth", str(2**62)], "--scale-growth must be >= 1"),
                      (["--bucket-mb", "inf"], "--bucket-mb must be >= 0 and finite")):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        err = capsys.readouterr().err
        assert msg in err, f"{argv}: {err}"


def test_tiny_run_learns(tmp_path):
    m = run(tmp_path, "a", "--iters", "60", "--lr", "1e-2", "--log-every", "10", "--save-every", "60", "--eval-every", "60")
    first, last = losses(m)[0], losses(m)[-1]
    assert last < first - 0.5, f"loss went from {first:.3f} to {last:.3f}"
    val = [e["val_bpc"] for e in m if "val_bpc" in e]
    assert val and val[-1] < 8 - 3, f"held-out bpc {val} not well below 8 bits"
    assert {"step", "loss", "bpc", "lr", "grad_norm", "chars_per_s"} <= set(m[0])
    assert os.path.isfile(tmp_path / "a" / "config.json") and os.path.isfile(tmp_path / "a" / "ckpt.pt")


@pytest.mark.parametrize("rule, lr", [("none", 2e-3), ("linear", 2e-3 * 4 / 128), ("sqrt", 2e-3 * (4 / 128) ** 0.5)])
def test_the_lr_rule_scales_the_peak_lr_to_the_batch(tmp_path, rule, lr):
    m = run(tmp_path, "a", "--iters", "1", "--lr", "2e-3", "--lr-rule", rule)  # batch 4: the one step is the peak
    assert m[0]["lr"] == pytest.approx(lr, rel=1e-6), f"{rule}: lr {m[0]['lr']}, want {lr}"


@pytest.mark.parametrize("iters", [7, 1000])  # fewer windows than the loader holds; more (it evaluates all 166)
def test_evaluate_equals_a_float64_reference_over_each_rows_stream(tmp_path, iters):
    """train.evaluate (windows of a held-out loader, state carried) against the mean cross-entropy of each row's
    whole stream read in one window by a float64 copy of the model, in bits."""
    rng = np.random.default_rng(0)
    path = tmp_path / "val.bin"
    path.write_bytes(rng.integers(97, 123, 5000, dtype=np.uint8).tobytes())
    torch.manual_seed(0)
    model = mlstm.MLSTM(hidden=16)
    loader = data.ByteLoader(str(path), batch_size=3, seq_len=10)
    got = train.evaluate(model, loader, iters, torch.device("cpu"))
    n = min(iters, (5000 // 3 - 1) // 10)  # the windows there are to evaluate
    stream = np.memmap(path, dtype=np.uint8, mode="r")
    rows = torch.from_numpy(np.stack([stream[b * loader.L: b * loader.L + n * 10 + 1] for b in range(3)]).astype(np.int64))
    with torch.no_grad():
        logits, _ = model.double()(rows[:, :-1])
        nats = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), rows[:, 1:].reshape(-1))
    ref = nats.item() / math.log(2)
    assert abs(got - ref) < 1e-5, f"evaluate {got} vs reference {ref} bits: |diff| {abs(got - ref):.2e}"


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight = losses(run(tmp_path, "straight", "--iters", "8"))
    first = losses(run(tmp_path, "resumed", "--iters", "8", "--stop-at", "4"))
    assert len(first) == 4
    second = losses(run(tmp_path, "resumed", "--iters", "8", "--resume"))[4:]
    assert first + second == straight, f"resumed {first + second} vs straight {straight}"
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert diff == 0.0, f"parameters differ by {diff}"


def test_resume_from_a_checkpoint_of_plain_adam(tmp_path):
    # Checkpoints written before train.py used fused Adam hold a float lr and no fused flag: they still resume.
    straight = losses(run(tmp_path, "straight", "--iters", "6"))
    first = losses(run(tmp_path, "resumed", "--iters", "6", "--stop-at", "3"))
    path = tmp_path / "resumed" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["optimizer"]["param_groups"] = [{**g, "lr": 2e-3, "fused": None} for g in ckpt["optimizer"]["param_groups"]]
    torch.save(ckpt, path)
    second = losses(run(tmp_path, "resumed", "--iters", "6", "--resume"))[3:]
    diff = max(abs(a - b) for a, b in zip(first + second, straight))
    assert len(first + second) == 6 and diff == 0.0, f"resumed {first + second} vs straight {straight}"


def test_resume_with_another_config_is_refused_and_keeps_the_runs_config(tmp_path):
    run(tmp_path, "a", "--iters", "2")
    with pytest.raises(SystemExit, match="another configuration.*hidden"):
        run(tmp_path, "a", "--iters", "2", "--resume", "--hidden", "8")
    with open(tmp_path / "a" / "config.json") as f:
        assert json.load(f)["hidden"] == 16, "the refused command overwrote the run's config.json"


def test_metrics_after_the_checkpoint_are_not_logged_twice_on_resume(tmp_path, capsys):
    run(tmp_path, "a", "--iters", "8", "--stop-at", "4")
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:  # what a kill after step 4's checkpoint leaves
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    m = run(tmp_path, "a", "--iters", "8", "--resume")
    steps = [e["step"] for e in m if "loss" in e]
    assert steps == list(range(1, 9)), f"logged steps after resume: {steps}"
    assert "earlier run" not in capsys.readouterr().out
    # a fresh run into the folder, ended after its first checkpoint: its own log only, and a warning; the earlier
    # run's checkpoint is kept aside, not rotated into ckpt.prev.pt where --resume would fall back to it
    m = run(tmp_path, "a", "--iters", "3", "--stop-at", "1")
    assert [e["step"] for e in m if "loss" in e] == [1]
    assert "warning: " + str(tmp_path / "a") + " holds an earlier run" in capsys.readouterr().out
    assert not (tmp_path / "a" / "ckpt.prev.pt").exists(), "the earlier run's checkpoint is the fallback"
    assert torch.load(tmp_path / "a" / "ckpt.pt.earlier", weights_only=True)["step"] == 8
    # more fresh runs: every earlier run's checkpoints are kept, a run's ckpt.pt and ckpt.prev.pt under one number
    for iters in ("2", "4", "2"):
        run(tmp_path, "a", "--iters", iters)
    steps = {n: torch.load(tmp_path / "a" / n, weights_only=True)["step"] for n in os.listdir(tmp_path / "a")
             if ".earlier" in n}
    assert steps == {"ckpt.pt.earlier": 8, "ckpt.prev.pt.earlier": 6, "ckpt.pt.earlier2": 1, "ckpt.pt.earlier3": 2,
                     "ckpt.pt.earlier4": 4, "ckpt.prev.pt.earlier4": 2}, steps


def test_resuming_a_finished_run_evaluates_nothing_twice(tmp_path, capsys):
    first = run(tmp_path, "a", "--iters", "3")
    assert sum("test_bpc" in e for e in first) == 1, first[-2:]
    again = run(tmp_path, "a", "--iters", "3", "--resume")
    assert again == first, f"metrics.jsonl changed: {again[len(first) - 1:]}"
    assert "already complete at step 3: nothing to do" in capsys.readouterr().out


def test_a_skipped_step_logs_a_null_grad_norm_and_strict_json(tmp_path):
    run(tmp_path, "a", "--iters", "3", "--dtype", "fp16", "--loss-scale", "1e18")  # overflows: skipped steps
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        m = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in f]
    assert m[0]["skipped"] == 1 and m[0]["grad_norm"] is None, m[0]


def test_logged_speed_leaves_out_evaluations_and_checkpoints(tmp_path, monkeypatch):
    """A fake clock: each training step takes 1 ms of it, each evaluation and checkpoint 1000 s."""
    clock = [0.0]
    real_eval, real_ckpt, real_loss = train.evaluate, train.save_checkpoint, train.loss_fn

    def slow(real):
        def f(*a, **k):
            clock[0] += 1000.0
            return real(*a, **k)
        return f

    def step_loss(*a):
        clock[0] += 1e-3
        return real_loss(*a)

    monkeypatch.setattr(train, "evaluate", slow(real_eval))
    monkeypatch.setattr(train, "save_checkpoint", slow(real_ckpt))
    monkeypatch.setattr(train, "loss_fn", step_loss)
    monkeypatch.setattr(time, "time", lambda: clock[0])
    m = run(tmp_path, "a", "--iters", "9", "--log-every", "1", "--save-every", "2", "--eval-every", "3")
    ms = [4 * 16 / e["chars_per_s"] * 1e3 for e in m if "loss" in e]
    assert len(ms) == 9 and max(ms) < 2, f"ms per step {ms}: evaluations or checkpoints counted as training"


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = train.loss_fn, []

    def poisoned(logits, y):  # the 6th training step returns NaN
        calls.append(1)
        loss = real(logits, y)
        return loss * math.nan if len(calls) == 6 else loss

    monkeypatch.setattr(train, "loss_fn", poisoned)
    with pytest.raises(SystemExit, match="diverged at step 6"):
        run(tmp_path, "a", "--iters", "10")
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_cuda_graph_and_triton_without_cuda_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="--cuda-graph needs a CUDA device, and this run is on cpu"):
        run(tmp_path, "a", "--iters", "2", "--cuda-graph")
    with pytest.raises(SystemExit, match=r"--triton needs a CUDA device \(this run is on cpu\)"):
        run(tmp_path, "a", "--iters", "2", "--triton")


def test_recompute_run_equals_the_plain_run_and_resumes(tmp_path):
    plain = losses(run(tmp_path, "plain", "--iters", "6"))
    first = losses(run(tmp_path, "re", "--iters", "6", "--recompute", "5", "--stop-at", "3"))  # segments 5+5+5+1
    second = losses(run(tmp_path, "re", "--iters", "6", "--recompute", "5", "--resume"))[3:]
    # The weight gradients are summed per segment, then added: another order of the same sums. Measured: equal.
    diff = max(abs(a - b) for a, b in zip(first + second, plain))
    assert len(first + second) == 6 and diff < 1e-5, f"recompute {first + second} vs {plain}: max |diff| {diff}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("flags", [("--cuda-graph",), ("--triton",), ("--cuda-graph", "--triton"),
                                   ("--triton", "--recompute", "5")])
def test_fast_paths_run_equal_the_eager_run_and_resume(tmp_path, flags):
    gpu = ("--iters", "6", "--device", "cuda", "--dtype", "fp16")
    eager = losses(run(tmp_path, "eager", *gpu))
    first = losses(run(tmp_path, "fast", *gpu, *flags, "--stop-at", "3"))
    second = losses(run(tmp_path, "fast", *gpu, *flags, "--resume"))[3:]
    diff = max(abs(a - b) for a, b in zip(first + second, eager))
    assert len(first + second) == 6 and diff < 1e-3, f"{flags}: {first + second} vs eager {eager}: max |diff| {diff}"


def test_clipping_and_the_epoch_reset_follow_a_plain_reference_loop(tmp_path):
    """train.py's first 1.5 epochs against the loop written the obvious way: torch's Adam, clip_grad_norm_, the
    state carried between windows and zeroed when the streams restart. --clip 0.05 is below every gradient norm,
    so each step is clipped."""
    (tmp_path / "small").mkdir()
    small = corpus(tmp_path / "small", n=30)  # 41 steps per epoch
    got = losses(run(tmp_path, "a", "--data", small, "--epochs", "1.5", "--iters", "0", "--clip", "0.05",
                     "--lr", "1e-2", "--warmup", "3"))
    train_bin, = glob.glob(str(tmp_path / "cache" / "*" / "train.bin"))
    loader = data.ByteLoader(train_bin, 4, 16)
    spe = (os.path.getsize(train_bin) // 4 - 1) // 16
    total = round(1.5 * spe)
    torch.manual_seed(1)
    model = mlstm.MLSTM(hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref, norms = [], []
    for step in range(total):
        if step % spe == 0:
            state = (torch.zeros(4, 16), torch.zeros(4, 16))
        x, y = (torch.from_numpy(a) for a in loader.batch(step))
        # warmup to 1e-2 over 3 steps, then linear decay to 0 at the last step
        opt.param_groups[0]["lr"] = 1e-2 * (step + 1) / 3 if step < 3 else 1e-2 * (total - step) / (total - 3)
        logits, (h, c) = model(x, state)
        state = (h.detach(), c.detach())
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05).item())
        opt.step()
        ref.append(loss.item())
    assert min(norms) > 0.05, f"a step was not clipped: smallest gradient norm {min(norms)}"
    diff = max(abs(a - b) for a, b in zip(got, ref))
    assert spe < len(got) == total and diff < 1e-5, f"{len(got)} steps, {spe} per epoch: max |loss - reference| {diff}"


# Losses of the first 5 steps of the tiny model above (seed 1, CPU, fp32), recorded with torch 2.13.0.
GOLDEN = [5.55435, 5.566417, 5.535129, 5.537367, 5.522027]


def test_stop_at_beyond_the_schedule_ends_with_the_schedule(tmp_path):
    m = run(tmp_path, "a", "--iters", "4", "--stop-at", "10")
    assert [e["step"] for e in m if "loss" in e] == [1, 2, 3, 4] and any("test_bpc" in e for e in m), m[-2:]


def test_golden_losses(tmp_path):
    got = losses(run(tmp_path, "g", "--iters", "5", "--lr", "1e-3"))
    diff = max(abs(a - b) for a, b in zip(got, GOLDEN))
    assert len(got) == 5 and diff < 1e-4, f"losses {got} vs golden {GOLDEN}: max |diff| {diff}"


def test_fractional_epochs_end_the_run_with_its_final_log_and_test_bpc(tmp_path):
    m = run(tmp_path, "a", "--iters", "0", "--epochs", "0.37")
    steps = [e["step"] for e in m if "loss" in e]
    with open(tmp_path / "a" / "config.json") as f:
        assert json.load(f)["epochs"] == 0.37
    train_bin, = glob.glob(str(tmp_path / "cache" / "*" / "train.bin"))
    per_epoch = (os.path.getsize(train_bin) // 4 - 1) // 16  # rows of a 4-row batch, windows of 16 bytes
    assert steps == list(range(1, round(0.37 * per_epoch) + 1)), f"logged steps {steps}, {per_epoch} per epoch"
    assert any("test_bpc" in e for e in m), f"no final test bpc in {m[-3:]}"
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["step"] == steps[-1]


def test_export_writes_fp16_weights_that_load_pretrained_reads(tmp_path, capsys, monkeypatch):
    run(tmp_path, "a", "--iters", "4", "--lr", "1e-2")
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    with pytest.raises(SystemExit, match=r"--export: .*nowhere.*ckpt\.pt is not a usable"):
        train.export(str(tmp_path / "nowhere"), str(tmp_path / "x.pt"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"--export: cannot write .*file/x\.pt"):
        train.export(str(tmp_path / "a"), str(tmp_path / "file" / "x.pt"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    for target in ("dir", "notes.txt"):
        with pytest.raises(SystemExit, match=f"--export: .*{target} exists and is not a model file to replace"):
            train.export(str(tmp_path / "a"), str(tmp_path / target))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    for target in ("ckpt.pt", "ckpt.prev.pt"):  # a resumable checkpoint is never written over
        before = (tmp_path / "a" / target).read_bytes()
        with pytest.raises(SystemExit, match=f"--export: .*{target} is a train.py checkpoint"):
            train.export(str(tmp_path / "a"), str(tmp_path / "a" / target))
        assert (tmp_path / "a" / target).read_bytes() == before

    def full(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SystemExit, match=r"--export: cannot write .*y\.pt \(OSError"):
        train.export(str(tmp_path / "a"), str(tmp_path / "y.pt"))
    monkeypatch.undo()
    assert not (tmp_path / "y.pt.tmp").exists(), "the failed export left its temporary file"
    path = str(tmp_path / "new" / "released.pt")  # its folder is created
    train.export(str(tmp_path / "a"), path)
    assert "step 4, hidden 16" in capsys.readouterr().out
    assert os.path.getsize(path) < os.path.getsize(tmp_path / "a" / "ckpt.pt") / 2  # no optimizer, half the bytes
    model, config = checkpoints.load_pretrained(path)
    assert config == ckpt["config"]
    for k, w in model.state_dict().items():  # fp16 rounding: relative error at most 2^-11 per weight
        ref = ckpt["model"][k]
        err = ((w - ref).abs() / ref.abs().clamp_min(1e-4)).max().item()
        assert w.dtype == torch.float32 and err <= 2 ** -11, f"{k}: max relative error {err:.2e}"
    ref = mlstm.MLSTM(hidden=16)
    ref.load_state_dict(ckpt["model"])
    x = torch.randint(0, 256, (2, 32))
    diff = (model(x)[0] - ref(x)[0]).abs().max().item()
    assert diff < 1e-2, f"logits of the fp16-stored model differ from the checkpoint's by {diff:.2e}"


def test_the_reference_loop_trains_to_the_same_losses_as_the_fast_one(tmp_path, capsys):
    """train.py --reference-loop (mlstm.py's loop of `cell` under autograd) against the default (fast/loop.py's
    hand-written backward): 12 steps from the same seed log the same losses to float32 rounding."""
    fast = losses(run(tmp_path, "fast", "--iters", "12"))
    ref = losses(run(tmp_path, "ref", "--iters", "12", "--reference-loop"))
    diff = max(abs(a - b) for a, b in zip(fast, ref))
    assert len(fast) == len(ref) == 12 and diff < 1e-5, f"losses differ by {diff:.2e}: {fast} vs {ref}"
    with pytest.raises(SystemExit):
        train.parse_args(["--reference-loop", "--recompute", "4"])
    assert "--reference-loop is mlstm.py's plain loop" in capsys.readouterr().err
