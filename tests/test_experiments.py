"""experiments.py (and experiment_runs.py, which runs its plan) on a tiny fixture corpus: a real sweep (hidden 8, a few steps) collected into tables, a run
forced to diverge reported as 'Div', and a second invocation that runs nothing (resumable); the flag checks, and
the reuse of a finished run or held-out BPC only for the same settings (on fakes)."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from tools import experiment_runs as runner
from tools import experiments
import mlstm


def write_fixtures(root):
    rng = random.Random(0)
    words = "the movie was good bad great awful plot actor scene fun boring and but very not".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
                                for _ in range(1500)) + "\n")
    sst2 = root / "sst2"
    sst2.mkdir()
    for split, ks in (("train", range(40)), ("dev", range(12)), ("test", range(100, 116))):
        rows = ["label,sentence"]  # test: other texts, every fifth label against its words (val acc != test acc)
        for k in ks:
            label = 1 - k % 2 if split == "test" and k % 5 == 0 else k % 2
            rows.append(f"{label},{'a good great fun film' if k % 2 else 'a bad awful boring film'} {k}")
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
    cwd = os.getcwd()
    try:
        first = experiments.main(argv)  # chdirs to the repo root
    finally:
        os.chdir(cwd)
    return root, argv, first


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table_rows(md, heading):
    """The rows (lists of stripped cells) of the tables under `heading` in results.md, up to the next heading."""
    section = md.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]


def assert_tables_aligned(md):
    """Every row of every Markdown table has as many cells as the table's header (else it does not render)."""
    blocks, block = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            blocks.append(block)
            block = []
    for b in blocks:
        widths = [len(line.strip().strip("|").split("|")) for line in b]
        assert len(set(widths)) == 1, f"cells per row {widths} in the table:\n" + "\n".join(b)
        assert all(line.endswith("|") for line in b), "a row without its closing pipe:\n" + "\n".join(b)
    return len(blocks)


def row(rows, *first):
    """The one row whose leading cells are `first`."""
    got = [r for r in rows if r[:len(first)] == list(first)]
    assert len(got) == 1, f"{len(got)} rows start with {first}: {rows}"
    return got[0]


def test_tiny_sweep_is_collected_into_tables(sweep):
    root, _, res = sweep
    names = [r.name for r in res["experiments"]["size"]]
    assert len(names) == 1, f"size runs: {names}"
    ok = res["runs"][names[0]]
    assert ok["status"] == "ok", f"status {ok['status']}: {ok}"
    assert ok["iters"] == 10 and ok["curve"] and ok["curve"][-1][0] == 10, f"iters {ok['iters']}, curve {ok['curve']}"
    # each number of the record against the file it comes from in the run's folder
    run_dir = root / "out" / "runs" / names[0]
    heldout = json.loads((run_dir / "heldout.json").read_text())
    assert (ok["heldout_bpc"], ok["heldout_chars"]) == (heldout["bpc"], heldout["chars"]) and \
        heldout["chars"] == 2 * 4 * 16, f"record {ok['heldout_bpc']} on {ok['heldout_chars']}; heldout.json {heldout}"
    events = read_jsonl(run_dir / "metrics.jsonl")
    last_bpc = [e["bpc"] for e in events if "loss" in e][-1]
    last_test = [e["test_bpc"] for e in events if "test_bpc" in e][-1]
    assert (ok["train_bpc"], ok["train_test_bpc"]) == (last_bpc, last_test), \
        f"record {ok['train_bpc']}, {ok['train_test_bpc']}; metrics.jsonl {last_bpc}, {last_test}"
    tr = json.loads((run_dir / "sst2.json").read_text())  # transfer.py --json
    t = ok["transfer"].get("sst2") or {}
    for key in ("test_acc", "val_acc", "neuron", "neuron_test_acc", "C", "nonzero"):
        assert key in t and t[key] == tr[key], f"transfer {key}: record {t.get(key)}, sst2.json {tr[key]}"
    # the size run is the lr experiment's none:2e-3 run: shared, not trained twice
    assert names[0] in [r.name for r in res["experiments"]["lr"]], f"lr runs: {res['experiments']['lr']}"
    md = (root / "out" / "results.md").read_text()
    for want in ("## 1. Model size", "## 2. Learning-rate rules", "train.py --data", "--hidden 8",
                 "experiments.py --bpc", "transfer.py --checkpoint", "| 8 | ", "bag-of-words baseline"):
        assert want in md, f"{want!r} not in results.md:\n{md}"
    # the source files' numbers, formatted by hand, in their table rows
    bpc, train_bpc = f"{heldout['bpc']:.3f}", f"{last_bpc:.3f}"
    acc = f"{100 * tr['test_acc']:.1f} / {100 * tr['neuron_test_acc']:.1f}"
    size = row(table_rows(md, "## 1. Model size"), "8")
    assert size[2:6] == ["10", train_bpc, bpc, acc], f"size row {size[:6]}, want steps 10, {train_bpc}, {bpc}, {acc}"
    lr = table_rows(md, "## 2. Learning-rate rules at growing batch")
    summary, detail = row(lr, "fixed 0.002"), row(lr, "4", "fixed 0.002")
    assert summary[1] == f"{bpc} / {100 * tr['test_acc']:.1f}", f"lr summary row {summary}, want {bpc} / test acc"
    assert detail[4:7] == [train_bpc, bpc, acc], f"lr detail row {detail[:7]}, want {train_bpc}, {bpc}, {acc}"
    baseline = f"test {100 * tr['baseline_test_acc']:.1f}%, from"  # the first transfer computed the baseline
    assert md.count(baseline) == 2, f"{baseline!r} not in both experiments' baseline lines:\n{md}"
    assert assert_tables_aligned(md) == 3, md  # size, lr summary, lr detail
    assert md.count(" | SST-2 all / neuron | wall s | commands |") == 2, md  # the size and lr detail headers
    saved = json.loads((root / "out" / "results.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(res["runs"])), f"results.json runs: {saved['runs']}"
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
    run = json.loads((root / "out" / "runs" / div[0]["name"] / "run.json").read_text())
    assert div[0]["diverged_step"] == run["diverged_step"], f"record {div[0]['diverged_step']}, run.json {run}"
    lr = table_rows((root / "out" / "results.md").read_text(), "## 2. Learning-rate rules at growing batch")
    cell = f"**Div** (step {run['diverged_step']})"
    summary, detail = row(lr, "fixed 1e+06"), row(lr, "4", "fixed 1e+06")
    assert summary[1] == cell and detail[4:7] == [cell, cell, "Div"], f"Div rows {summary}, {detail[:7]}; want {cell}"


def test_bpc_alone_prepares_a_missing_corpus_on_stderr_and_prints_the_records_number(sweep, tmp_path, capsys,
                                                                                     monkeypatch):
    root, _, res = sweep
    name = res["experiments"]["size"][0].name
    ckpt = torch.load(root / "out" / "runs" / name / "ckpt.pt", weights_only=True)
    ckpt["config"]["cache_dir"] = str(tmp_path / "cache")  # its corpus cache is gone
    torch.save(ckpt, tmp_path / "ckpt.pt")
    monkeypatch.chdir(tmp_path)  # named relative to the working directory, not to the repo root main() runs in
    experiments.main(["--bpc", "ckpt.pt", "--eval-rows", "2", "--eval-seq", "16", "--eval-windows",
                      "4", "--device", "cpu"])
    out, err = capsys.readouterr()
    heldout = json.loads((root / "out" / "runs" / name / "heldout.json").read_text())
    assert json.loads(out)["bpc"] == heldout["bpc"], f"stdout {out!r}; heldout.json {heldout}"
    assert "prepare: " in err and str(tmp_path / "cache") in err, f"no progress of the preparation in {err!r}"


def test_second_invocation_skips_finished_runs(sweep, monkeypatch):
    root, argv, first = sweep
    monkeypatch.chdir(os.getcwd())  # main() chdirs to the repo root: back to this folder afterwards

    def refuse(*a, **k):
        raise AssertionError(f"a finished run was started again: {a}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(runner, "heldout_bpc", refuse)
    second = experiments.main(argv)
    for name, rec in first["runs"].items():
        got = second["runs"][name]
        for key in ("status", "heldout_bpc", "train_bpc", "transfer", "commands"):
            assert got[key] == rec[key], f"{name} {key}: first {rec[key]}, second {got[key]}"


def test_the_plan_gives_each_rule_batch_and_dtype_its_command_and_the_same_characters(tmp_path):
    a = experiments.parse_args(["--only", "lr,precision", "--out", str(tmp_path), "--batches", "4,16", "--rules",
                                "sqrt:1e-3,linear:2e-3", "--lr-chars", "4096", "--lr-hidden", "8", "--seq-len", "16",
                                "--dtypes", "fp32,bf16", "--precision-hidden", "8", "--size-batch", "8", "--chars",
                                "2048", "--size-lr", "none:2e-3"])
    _, exps = experiments.plan(a)
    scale = {"none": lambda b: 1.0, "linear": lambda b: b / 128, "sqrt": lambda b: (b / 128) ** 0.5}
    seen = set()
    for exp, chars in (("lr", 4096), ("precision", 2048)):
        for r in exps[exp]:
            flags = dict(zip(r.argv[1::2], map(str, r.argv[2::2])))  # train.py --flag value pairs
            batch, iters = int(flags["--batch-size"]), int(flags["--iters"])
            rule, lr = flags["--lr-rule"], float(flags["--lr"])
            seen.add((exp, batch, rule, lr, flags["--dtype"]))
            assert iters * batch * 16 == chars, f"{r.name}: {iters} steps x {batch} x 16 != {chars} characters"
            want = lr * scale[rule](batch)
            assert abs(r.peak_lr() - want) <= 1e-12 * want, f"{r.name}: peak lr {r.peak_lr()}, want {want}"
    assert seen == {("lr", b, rule, lr, "fp32") for b in (4, 16) for rule, lr in (("sqrt", 1e-3), ("linear", 2e-3))} | \
        {("precision", 8, "none", 2e-3, d) for d in ("fp32", "bf16")}, seen


@pytest.mark.parametrize("flag", ["--cuda-graph", "--triton"])
def test_gpu_scale_trains_with_the_fast_paths_and_cpu_scale_cannot(capsys, flag):
    def argv(*flags):
        return experiments.plan(experiments.parse_args(["--only", "lr", *flags]))[0].values()

    assert all(flag in r.argv for r in argv("--scale", "gpu"))
    assert not any(flag in r.argv for r in argv("--scale", "gpu", flag, "off"))
    assert not any(flag in r.argv for r in argv("--scale", "cpu"))
    # the GPU preset on a CPU, or under torchrun, where the fast paths have not run: off unless asked for
    assert not any(flag in r.argv for r in argv("--scale", "gpu", "--device", "cpu"))
    assert not any(flag in r.argv for r in argv("--scale", "gpu", "--nproc", "2"))
    assert all(flag in r.argv for r in argv("--scale", "gpu", "--nproc", "2", flag, "on"))
    with pytest.raises(SystemExit):
        experiments.parse_args(["--scale", "cpu", flag, "on"])
    assert f"{flag} on needs --device cuda" in capsys.readouterr().err


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


def test_a_device_this_machine_lacks_is_refused_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match="--device bogus: expected cpu, cuda or cuda:N"):
        experiments.main(["--out", str(tmp_path / "out"), "--device", "bogus"])
    assert not (tmp_path / "out").exists()
    experiments.parse_args(["--device", "bogus", "--dry-run"])  # planning only: the device is not used
    if not torch.cuda.is_available():  # the GPU-scale plan printed on a machine without one
        experiments.main(["--out", str(tmp_path / "out"), "--scale", "gpu", "--dry-run"])
        assert not (tmp_path / "out").exists()


def test_same_argv_compares_paths_by_the_file_and_everything_else_as_it_is(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "d.txt")
    assert runner.same_argv(["--data", str(tmp_path / "d.txt")], ["--data", str(link)])
    assert not runner.same_argv(["--data", str(tmp_path / "d.txt")], ["--data", str(tmp_path / "d.txt"), "x"])
    assert not runner.same_argv(["--lr", "0.002"], ["--lr", "0.003"])


def test_bpc_of_a_checkpoint_without_a_corpus_in_its_config_is_an_error(tmp_path):
    torch.save({"model": mlstm.MLSTM(hidden=8, embed=8).state_dict(),
                "config": {"hidden": 8, "embed": 8, "no_weight_norm": False}}, tmp_path / "m.pt")
    with pytest.raises(SystemExit, match=r"m\.pt: its config has no 'data': not from train\.py"):
        runner.heldout_bpc(str(tmp_path / "m.pt"))


def test_a_missing_corpus_or_an_unwritable_out_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "file").write_text("")
    corpus, _ = write_fixtures(tmp_path)
    for flags, message in ((["--data", str(tmp_path / "nope.txt")], "nope.txt: no such file or folder"),
                           (["--data", str(corpus), "--out", str(tmp_path / "file")], "Not a directory")):
        p = subprocess.run([sys.executable, "tools/experiments.py", "--only", "precision", "--dtypes", "fp32",
                            "--out", str(tmp_path / "out"), *flags], cwd=runner.ROOT, capture_output=True,
                           text=True)
        assert p.returncode == 1 and p.stderr.startswith("error: ") and message in p.stderr \
            and "Traceback" not in p.stderr, f"{flags}: exit {p.returncode}, stderr:\n{p.stderr}"


def test_rel_keeps_relative_only_paths_inside_the_root_or_given_relative(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "out").mkdir(parents=True)
    monkeypatch.setattr(runner, "ROOT", str(root))
    monkeypatch.chdir(root)
    want = {str(tmp_path / "tmp" / "x"): str(tmp_path / "tmp" / "x"),  # one level above the root, absolute
            str(root / "out" / "r"): os.path.join("out", "r"),
            os.path.join("out", "r"): os.path.join("out", "r"),
            os.path.join("..", "shared", "sst2"): os.path.join("..", "shared", "sst2"),  # the defaults' form
            str(tmp_path / "repox" / "y"): str(tmp_path / "repox" / "y")}
    got = {p: runner.rel(p) for p in want}
    assert got == want, f"rel() gave {got}, want {want}"
    monkeypatch.chdir(root / "out")  # relative to the working directory: the same path, named from the root
    assert runner.rel("r") == os.path.join("out", "r"), runner.rel("r")


def test_a_run_trained_with_another_thread_count_is_trained_again(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # the run's files go to --out, whatever the working directory
    trained = []

    def fake_run(argv, log_path, a):
        trained.append(a.threads)
        return 0, 1.0, ""

    monkeypatch.setattr(runner, "run_logged", fake_run)
    a = experiments.parse_args(["--out", str(tmp_path / "out"), "--threads", "1"])
    r = experiments.Run(a, 8, 4, 640, "none", 2e-3, "fp32")
    runner.train_run(r, a)
    runner.train_run(r, a)
    assert trained == [1], f"same argv and threads: trained with {trained}"
    assert (tmp_path / "out" / "runs" / r.name / "run.json").is_file(), f"run.json not in --out: {r.dir}"
    assert not os.listdir(tmp_path / "cwd"), os.listdir(tmp_path / "cwd")
    a.threads = 2
    got = runner.train_run(r, a)
    assert trained == [1, 2], f"threads 1 then 2: trained with {trained}"
    assert got["threads"] == "2" and got["command"].startswith("OMP_NUM_THREADS=2 python train.py"), f"{got}"
    aside = [n for n in os.listdir(tmp_path / "out" / "runs") if n.startswith(r.name + ".replaced-")]
    assert len(aside) == 1 and "OMP_NUM_THREADS=1" in (tmp_path / "out" / "runs" / aside[0] / "run.json").read_text(), \
        f"the threads-1 run was not kept aside: {os.listdir(tmp_path / 'out' / 'runs')}"


def test_the_same_data_named_another_way_is_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run_logged", lambda argv, log_path, a: (0, 1.0, ""))
    (tmp_path / "d.txt").write_text("x")
    runs = []
    for data in (str(tmp_path / "d.txt"), os.path.relpath(tmp_path / "d.txt", runner.ROOT)):
        monkeypatch.chdir(runner.ROOT)  # where main() runs them, and the relative path starts
        a = experiments.parse_args(["--out", str(tmp_path / "out"), "--data", data, "--threads", "1"])
        r = experiments.Run(a, 8, 4, 640, "none", 2e-3, "fp32")
        runs.append(runner.train_run(r, a)["command"])
    assert runs[0] == runs[1], f"retrained for another spelling of --data: {runs}"
    assert os.listdir(tmp_path / "out" / "runs") == [r.name], os.listdir(tmp_path / "out" / "runs")


def test_heldout_bpc_is_recomputed_for_other_settings_and_reported_as_evaluated(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # heldout.json goes to --out, whatever the working directory
    asked = []

    def fake_bpc(ckpt, rows, seq, windows, split, device):
        asked.append((rows, seq, windows))
        rows, windows = min(rows, 3), min(windows, 5)  # as on a small test split
        return dict(bpc=2.3456, chars=rows * windows * seq, rows=rows, seq=seq, windows=windows, split=split, params=1)

    monkeypatch.setattr(runner, "heldout_bpc", fake_bpc)
    a = experiments.parse_args(["--out", str(tmp_path / "out"), "--only", "precision", "--dtypes", "fp32",
                                "--eval-rows", "16", "--eval-seq", "32", "--eval-windows", "4"])
    a.train_bytes = 10**6
    r = experiments.Run(a, 8, 4, 640, "none", 2e-3, "fp32")
    os.makedirs(r.dir)
    runner.eval_run(r, a)
    runner.eval_run(r, a)
    assert asked == [(16, 32, 4)], f"same settings: evaluated {asked}"
    assert (tmp_path / "out" / "runs" / r.name / "heldout.json").is_file(), f"heldout.json not in --out: {r.dir}"
    assert not os.listdir(tmp_path / "cwd"), os.listdir(tmp_path / "cwd")
    a.eval_windows = 8
    heldout = runner.eval_run(r, a)
    assert asked == [(16, 32, 4), (16, 32, 8)], f"--eval-windows 4 then 8: evaluated {asked}"
    status = dict(status="ok", command="python train.py", wall_s=1.0, code={})
    rec = runner.collect(r, a, status, heldout, {})
    assert rec["commands"]["train"] == status["command"], f"not the command as run: {rec['commands']}"
    md = experiments.tables(a, {"precision": [r]}, {r.name: rec},
                            dict(corpus="c", train_bytes=10**6, test_bytes=10**4, torch="t"))
    for want in ("3 streams x 5 windows x 32 bytes", "--eval-rows 3 --eval-seq 32 --eval-windows 5"):
        assert want in md, f"{want!r} (the evaluation run) not in results.md:\n{md}"
    assert (rec["heldout_bpc"], rec["heldout_chars"]) == (2.3456, 3 * 5 * 32), rec
    fp32 = row(table_rows(md, "## 3. Precision"), "fp32")
    assert fp32[3] == "2.346", f"precision row {fp32}: held-out BPC cell {fp32[3]!r}, want '2.346' (the faked 2.3456)"


def test_tables_without_transfer_tasks_keep_their_columns(tmp_path):
    a = experiments.parse_args(["--out", str(tmp_path / "out"), "--size-tasks", "", "--lr-tasks", "",
                                "--hidden-sizes", "8,16", "--batches", "4,8", "--rules", "none:2e-3,sqrt:1e-3"])
    a.train_bytes = 10**6
    runs, exps = experiments.plan(a)
    recs = {name: runner.collect(r, a, dict(status="failed", command="python train.py"), None, {})
            for name, r in runs.items()}
    md = experiments.tables(a, exps, recs, dict(corpus="c", train_bytes=10**6, test_bytes=10**4, torch="t"))
    assert assert_tables_aligned(md) == 4, md  # size, lr summary, lr detail, precision


def test_rules_at_the_base_batch_share_one_run_and_every_table_cell_keeps_its_rule(tmp_path, capsys):
    """At batch 128 linear, sqrt and fixed with one base lr are the same training run: trained once, shown in
    every rule's cell. Records faked per run, so that a cell showing another run's number is seen."""
    rules = "linear:1e-3,sqrt:1e-3,none:1e-3,none:3e-3"
    a = experiments.parse_args(["--only", "lr", "--out", str(tmp_path / "out"), "--lr-tasks", "", "--batches",
                                "128,512", "--rules", rules])
    a.train_bytes = 10**6
    runs, exps = experiments.plan(a)
    names = sorted(runs)
    assert len(names) == 2 + 4 and len(exps["lr"]) == 8, names  # b128: 1e-3 and 3e-3; b512: four rates
    shared = [r for r in runs.values() if r.batch == 128 and r.lr == 1e-3]
    assert len(shared) == 1 and shared[0].rule == "none" and len(shared[0].rules) == 3, [r.name for r in shared]
    recs = {}
    for k, (name, r) in enumerate(sorted(runs.items())):
        recs[name] = runner.collect(r, a, dict(status="ok", command="python train.py"), None, {})
        recs[name]["heldout_bpc"] = 1 + k / 10  # a number per run
    md = experiments.tables(a, exps, recs, dict(corpus="c", train_bytes=10**6, test_bytes=10**4, torch="t"))
    assert assert_tables_aligned(md) == 2, md  # lr summary and detail
    lr = table_rows(md, "## 2. Learning-rate rules at growing batch")
    want = {name: f"{recs[name]['heldout_bpc']:.3f}" for name in names}
    for rule, lr_ in [(x.split(":")[0], float(x.split(":")[1])) for x in rules.split(",")]:
        cells = row(lr, experiments.rule_label(rule, lr_))[1:]
        grid = experiments.lr_grid(a, exps)
        assert cells == [want[grid[rule, lr_, b].name] for b in (128, 512)], f"{rule}:{lr_} cells {cells}"
    shared_row = row(lr, "128", "linear (0.001 at 128) = sqrt (0.001 at 128) = fixed 0.001")
    assert shared_row[5] == want[shared[0].name], shared_row
    assert len([r for r in lr if r[0] in ("128", "512")]) == 6, lr  # one detail row per training run
    # a size run at batch 128 is the lr run of any rule with its lr there too
    a = experiments.parse_args(["--only", "size,lr", "--out", str(tmp_path / "out"), "--size-tasks", "", "--lr-tasks",
                                "", "--hidden-sizes", "128", "--lr-hidden", "128", "--size-batch", "128", "--batches",
                                "128", "--chars", "1e6", "--lr-chars", "1e6", "--size-lr", "linear:1e-3", "--rules",
                                "sqrt:1e-3"])
    assert len(experiments.plan(a)[0]) == 1, sorted(experiments.plan(a)[0])
    experiments.main(["--only", "lr", "--out", str(tmp_path / "out"), "--batches", "128,512", "--rules", rules,
                      "--dry-run"])
    printed = [line for line in capsys.readouterr().out.splitlines() if "train.py --data" in line]
    assert len(printed) == 6 and len(set(printed)) == 6, printed
