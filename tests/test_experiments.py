"""experiments.py on a tiny fixture corpus: a real sweep (hidden 8, a few steps) collected into tables, a run
forced to diverge reported as 'Div', and a second invocation that runs nothing (resumable); the flag checks, and
the reuse of a finished run or held-out BPC only for the same settings (on fakes)."""
import json
import os
import random
import subprocess

import pytest

import experiments


def write_fixtures(root):
    rng = random.Random(0)
    words = "the movie was good bad great awful plot actor scene fun boring and but very not".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
                                for _ in range(1500)) + "\n")
    sst2 = root / "sst2"
    sst2.mkdir()
    for split, n in (("train", 40), ("dev", 12), ("test", 12)):
        rows = ["label,sentence"] + [f"{k % 2},{'a good great fun film' if k % 2 else 'a bad awful boring film'} {k}"
                                     for k in range(n)]
        (sst2 / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return corpus, sst2


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    corpus, sst2 = write_fixtures(root)
    argv = ["--only", "size,lr", "--out", str(root / "out"), "--data", str(corpus), "--sst2-dir", str(sst2),
            "--hidden-sizes", "8", "--size-batch", "4", "--seq-len", "16", "--chars", "640", "--size-lr", "none:2e-3",
            "--size-tasks", "sst2", "--lr-hidden", "8", "--batches", "4", "--lr-chars", "640",
            "--rules", "none:2e-3,none:1e6", "--lr-tasks", "sst2", "--sst2-limit", "0", "--device", "cpu",
            "--threads", "1", "--eval-rows", "2", "--eval-seq", "16", "--eval-windows", "4", "--points", "5"]
    first = experiments.main(argv)
    return root, argv, first


def test_tiny_sweep_is_collected_into_tables(sweep):
    root, _, res = sweep
    names = [r.name for r in res["experiments"]["size"]]
    assert len(names) == 1, f"size runs: {names}"
    ok = res["runs"][names[0]]
    assert ok["status"] == "ok", f"status {ok['status']}: {ok}"
    assert ok["iters"] == 10 and ok["curve"] and ok["curve"][-1][0] == 10, f"iters {ok['iters']}, curve {ok['curve']}"
    assert 0 < ok["heldout_bpc"] < 9 and ok["heldout_chars"] == 2 * 4 * 16, \
        f"held-out {ok['heldout_bpc']} on {ok['heldout_chars']} chars"
    assert ok["train_test_bpc"] is not None, f"train.py's test_bpc missing: {ok}"
    t = ok["transfer"].get("sst2")
    assert t and 0 <= t["test_acc"] <= 1 and 0 <= t["neuron_test_acc"] <= 1, f"transfer: {ok['transfer']}"
    # the size run is the lr experiment's none:2e-3 run: shared, not trained twice
    assert names[0] in [r.name for r in res["experiments"]["lr"]], f"lr runs: {res['experiments']['lr']}"
    md = (root / "out" / "results.md").read_text()
    for want in ("## 1. Model size", "## 2. Learning-rate rules", "train.py --data", "--hidden 8",
                 "experiments.py --bpc", "transfer.py --checkpoint", "| 8 | ", "bag-of-words baseline"):
        assert want in md, f"{want!r} not in results.md:\n{md}"
    saved = json.loads((root / "out" / "results.json").read_text())
    assert set(saved["runs"]) == set(res["runs"]), f"results.json runs: {list(saved['runs'])}"
    try:
        import matplotlib  # noqa: F401
        assert (root / "out" / "lr_rules.png").stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in md, f"no PNG and no message:\n{md}"


def test_diverging_run_is_reported_as_div(sweep):
    root, _, res = sweep
    div = [x for x in res["runs"].values() if x["base_lr"] == 1e6]
    assert len(div) == 1 and div[0]["status"] == "div", f"lr 1e6 runs: {[(x['name'], x['status']) for x in div]}"
    assert div[0]["diverged_step"] and div[0]["heldout_bpc"] is None and not div[0]["transfer"], f"{div[0]}"
    md = (root / "out" / "results.md").read_text()
    assert "**Div** (step" in md and "fixed 1e+06" in md, f"no Div cell in results.md:\n{md}"


def test_second_invocation_skips_finished_runs(sweep, monkeypatch):
    root, argv, first = sweep

    def refuse(*a, **k):
        raise AssertionError(f"a finished run was started again: {a}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(experiments, "heldout_bpc", refuse)
    second = experiments.main(argv)
    for name, rec in first["runs"].items():
        got = second["runs"][name]
        for key in ("status", "heldout_bpc", "train_bpc", "transfer", "commands"):
            assert got[key] == rec[key], f"{name} {key}: first {rec[key]}, second {got[key]}"


def test_gpu_scale_trains_with_cuda_graphs_and_cpu_scale_cannot(capsys):
    def argv(*flags):
        return experiments.plan(experiments.parse_args(["--only", "lr", *flags]))[0].values()

    assert all("--cuda-graph" in r.argv for r in argv("--scale", "gpu"))
    assert not any("--cuda-graph" in r.argv for r in argv("--scale", "gpu", "--cuda-graph", "off"))
    assert not any("--cuda-graph" in r.argv for r in argv("--scale", "cpu"))
    with pytest.raises(SystemExit):
        experiments.parse_args(["--scale", "cpu", "--cuda-graph", "on"])
    assert "--cuda-graph on needs --device cuda" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--points", "0"], "--points 0: expected a number >= 1"),
    (["--seq-len", "0"], "--seq-len 0: expected a number >= 1"),
    (["--chars", "-1"], "--chars -1: expected a number >= 1"),
    (["--eval-rows", "0"], "--eval-rows 0: expected a number >= 1"),
    (["--threads", "-1"], "--threads -1: expected a number >= 0"),
    (["--batches", "0"], "--batches '0': expected comma-separated integers >= 1"),
    (["--batches", "16,x"], "--batches '16,x': expected comma-separated integers >= 1"),
    (["--hidden-sizes", "-64"], "--hidden-sizes '-64': expected comma-separated integers >= 1"),
    (["--rules", "linear:abc"], "--rules 'linear:abc': item 'linear:abc': expected RULE:LR"),
    (["--size-lr", "bad:1"], "--size-lr 'bad:1': item 'bad:1': expected RULE:LR"),
    (["--size-lr", "none:1e-3,none:2e-3"], "--size-lr: expected one RULE:LR item, not 2"),
    (["--dtypes", "fp32,fp8"], "--dtypes 'fp32,fp8': expected comma-separated dtypes among fp32, fp16, bf16"),
    (["--train-dtype", "fp8"], "--train-dtype: invalid choice: 'fp8'"),
])
def test_bad_flags_are_refused_when_parsed(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        experiments.parse_args(["--dry-run", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, f"{flags}: exit {e.value.code}, stderr:\n{err}"


def test_a_run_trained_with_another_thread_count_is_trained_again(tmp_path, monkeypatch):
    trained = []

    def fake_run(argv, log_path, a):
        trained.append(a.threads)
        return 0, 1.0, ""

    monkeypatch.setattr(experiments, "run_logged", fake_run)
    a = experiments.parse_args(["--out", str(tmp_path), "--threads", "1"])
    r = experiments.Run(a, 8, 4, 640, "none", 2e-3, "fp32")
    experiments.train_run(r, a)
    experiments.train_run(r, a)
    assert trained == [1], f"same argv and threads: trained with {trained}"
    a.threads = 2
    got = experiments.train_run(r, a)
    assert trained == [1, 2], f"threads 1 then 2: trained with {trained}"
    assert got["threads"] == "2" and got["command"].startswith("OMP_NUM_THREADS=2 python train.py"), f"{got}"


def test_heldout_bpc_is_recomputed_for_other_settings_and_reported_as_evaluated(tmp_path, monkeypatch):
    asked = []

    def fake_bpc(ckpt, rows, seq, windows, split, device):
        asked.append((rows, seq, windows))
        rows, windows = min(rows, 3), min(windows, 5)  # as on a small test split
        return dict(bpc=2.0, chars=rows * windows * seq, rows=rows, seq=seq, windows=windows, split=split, params=1)

    monkeypatch.setattr(experiments, "heldout_bpc", fake_bpc)
    a = experiments.parse_args(["--out", str(tmp_path), "--only", "precision", "--dtypes", "fp32",
                                "--eval-rows", "16", "--eval-seq", "32", "--eval-windows", "4"])
    a.train_bytes = 10**6
    r = experiments.Run(a, 8, 4, 640, "none", 2e-3, "fp32")
    os.makedirs(r.dir)
    experiments.eval_run(r, a)
    experiments.eval_run(r, a)
    assert asked == [(16, 32, 4)], f"same settings: evaluated {asked}"
    a.eval_windows = 8
    heldout = experiments.eval_run(r, a)
    assert asked == [(16, 32, 4), (16, 32, 8)], f"--eval-windows 4 then 8: evaluated {asked}"
    status = dict(status="ok", command="python train.py", wall_s=1.0, code={})
    rec = experiments.collect(r, a, status, heldout, {})
    assert rec["commands"]["train"] == status["command"], f"not the command as run: {rec['commands']}"
    md = experiments.tables(a, {"precision": [r]}, {r.name: rec},
                            dict(corpus="c", train_bytes=10**6, test_bytes=10**4, torch="t"))
    for want in ("3 streams x 5 windows x 32 bytes", "--eval-rows 3 --eval-seq 32 --eval-windows 5"):
        assert want in md, f"{want!r} (the evaluation run) not in results.md:\n{md}"
