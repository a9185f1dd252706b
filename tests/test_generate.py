"""generate.py: the step sampler against model.forward and naive loops, greedy limits, seeds, the held
neuron, invalid UTF-8 output, prime framing, heatmaps, and the command line's errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import data
from tools import generate
import mlstm
import train
import transfer
from plumbing import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """16-unit models: a second thread only adds overhead (and stalls when the cores are busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(tmp_path, seed=0, favour=None, weight_norm=True):
    """A random 16-unit model saved as a train.py checkpoint; `favour`: a byte the output layer prefers."""
    torch.manual_seed(seed)
    model = mlstm.MLSTM(hidden=16, embed=8, weight_norm=weight_norm).eval()
    if favour is not None:
        with torch.no_grad():
            model.out.bias[favour] += 50.0
    path = str(tmp_path / f"ckpt{seed}.pt")
    config = {"hidden": 16, "embed": 8, "no_weight_norm": not weight_norm, "dtype": "fp32"}
    train.save_checkpoint(path, {"model": model.state_dict(), "config": config})
    return path, model


def naive_greedy(model, prime, n, neuron=None, value=0.0):
    """Greedy decoding written independently: model.rnn one byte at a time, c overwritten by hand."""
    with torch.no_grad():
        state, out = model.zero_state(1), list(prime)
        for t in range(len(prime) + n - 1):
            _, _, (h, c) = model.rnn(torch.tensor([[out[t]]]), state)
            if neuron is not None:
                c = c.clone()
                c[:, neuron] = value
            state = (h, c)
            if t >= len(prime) - 1:
                out.append(int(model.out(h).argmax()))
    return bytes(out)


@pytest.mark.parametrize("weight_norm", [True, False])
def test_step_logits_equal_forward(tmp_path, weight_norm):
    _, model = tiny(tmp_path, weight_norm=weight_norm)
    x = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        step, state, got = mlstm.stepper(model), model.zero_state(3), []
        for t in range(x.shape[1]):
            logits, state = step(x[:, t], state)
            got.append(logits)
        want, (h, c) = model(x)
    diff = (torch.stack(got, 1) - want).abs().max().item()
    assert diff < 1e-5 and (state[1] - c).abs().max() < 1e-5, f"step logits differ from forward by {diff:.2e}"


def test_greedy_and_its_limits(tmp_path):
    _, model = tiny(tmp_path)
    prime = generate.frame(b"The film")
    greedy = generate.sample(model, prime, 30, temperature=0)
    assert greedy == [naive_greedy(model, prime, 30)]
    assert generate.sample(model, prime, 30, temperature=1e-6, seed=5) == greedy
    assert generate.sample(model, prime, 30, temperature=1e-40, seed=5) == greedy  # logits / T beyond float32
    assert generate.sample(model, prime, 30, temperature=1.5, top_k=1, seed=5) == greedy
    assert generate.sample(model, prime, 30, temperature=0, num_samples=3) == greedy * 3


def test_seed_fixes_the_text(tmp_path):
    _, model = tiny(tmp_path)
    a, b, c = (generate.sample(model, b"\n ", 64, 1.0, num_samples=2, seed=s) for s in (7, 7, 8))
    assert a == b and a != c and a[0] != a[1]
    k = generate.sample(model, b"\n ", 64, 1.0, top_k=3, seed=7)[0]
    with torch.no_grad():  # every top-k draw is among the 3 most likely bytes after its own prefix
        logits, _ = model(torch.tensor([list(k)]))
    for t in range(2, len(k)):
        assert k[t] in logits[0, t - 1].topk(3).indices.tolist(), t


@pytest.mark.parametrize("unit", [5, 0])  # unit 0 as well: a held unit is never taken as "none"
def test_neuron_is_held_at_every_step(tmp_path, unit):
    _, model = tiny(tmp_path)
    x = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        step, state, free = mlstm.stepper(model, neuron=unit, value=3.0), model.zero_state(2), model(x)[0]
        ref = model.zero_state(2)
        for t in range(x.shape[1]):
            logits, state = step(x[:, t], state)
            assert (state[1][:, unit] == 3.0).all(), f"step {t}: c[:, {unit}] = {state[1][:, unit].tolist()}"
            _, _, (h, c) = model.rnn(x[:, t : t + 1], ref)
            c = c.clone()
            c[:, unit] = 3.0
            ref = (h, c)
            assert (logits - model.out(h)).abs().max() < 1e-5, t
    assert (logits - free[:, -1]).abs().max() > 1e-3  # holding the unit does change what the model writes
    prime = generate.frame(b"It was")
    for v in (-4.0, 4.0):
        assert generate.sample(model, prime, 25, 0, neuron=unit, value=v) == [naive_greedy(model, prime, 25, unit, v)]


def test_frame_is_data_normalize_without_the_closing_space():
    for text in ("Great &amp; fun\nfilm  ", "", "  caf\u00e9"):
        assert generate.frame(text.encode()) == data.normalize(text)[:-1]
    assert generate.frame(b"caf\xe9 \xff") == b"\n caf\xe9 \xff"  # invalid UTF-8 bytes kept as they are


def run(argv, capsys):
    generate.main(argv)
    return capsys.readouterr()


def test_invalid_utf8_output_is_replaced(tmp_path, capsys):
    path, model = tiny(tmp_path, favour=0xFF)  # greedy writes only 0xff bytes: never valid UTF-8
    assert generate.sample(model, b"\n ", 4, 0) == [b"\n \xff\xff\xff\xff"]
    for n in ("1", "2"):  # streamed through the incremental decoder, and whole
        out = run(["--checkpoint", path, "--temperature", "0", "--length", "4", "--num-samples", n], capsys).out
        assert out.count("\n \ufffd\ufffd\ufffd\ufffd\n") == int(n), out
    # A character split between the prime and the first sampled byte is decoded whole: argv carries the
    # raw prime byte 0xc3 as the surrogate \udcc3, the model writes 0xa9 ("\xc3\xa9" is UTF-8 for "e acute").
    path, _ = tiny(tmp_path, seed=1, favour=0xA9)
    out = run(["--checkpoint", path, "--raw", "--prime", "caf\udcc3", "--temperature", "0", "--length", "3"], capsys)
    assert out.out == "caf\u00e9\ufffd\ufffd\n", out.out


def test_results_file_sign_and_heatmaps(tmp_path, capsys):
    path, model = tiny(tmp_path)
    results, page = tmp_path / "results.json", tmp_path / "h.html"
    results.write_text(json.dumps({"neuron": 3, "neuron_sign": -1, "test_acc": 0.9}))
    out = run(["--checkpoint", path, "--results", str(results), "--value", "2", "--temperature", "0",
               "--length", "20", "--heatmap", str(page)], capsys).out
    want = generate.sample(model, b"\n ", 20, 0, neuron=3, value=-2.0)[0]  # +2 in the neuron's direction
    assert out == want.decode("utf-8", "replace") + "\n"
    assert "neuron 3 (sign -1), cell state, held at -2" in page.read_text()
    hidden = tmp_path / "hidden.json"  # a neuron of the hidden state is not the cell unit generate.py holds
    hidden.write_text(json.dumps({"neuron": 3, "neuron_sign": 1, "feature": "hidden"}))
    fails(["--checkpoint", path, "--results", str(hidden)], "its neuron is a unit of the hidden state", capsys)
    trace = transfer.unit_trace(model, data.normalize("good <b>film</b>"), 3)
    for sign in (1, -1):  # the colours follow the unit times its sign: green is positive sentiment either way
        run(["--checkpoint", path, "--neuron", "3", "--sign", str(sign), "--text", "good <b>film</b>", "--heatmap",
             str(page)], capsys)
        html = page.read_text()
        assert ">&lt;</span>" in html and f'title="{sign * trace[-1]:.4g}"' in html, html
        assert f'title="{sign * trace[4]:.4g}"' in html and f"neuron 3 (sign {sign:+d})" in html


def test_bytes_prime_from_the_command_line(tmp_path):
    path, model = tiny(tmp_path)
    r = subprocess.run([sys.executable, "tools/generate.py", "--checkpoint", path, "--prime", b"caf\xe9 ok",
                        "--length", "8", "--temperature", "0"], cwd=ROOT, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    want = generate.sample(model, b"\n caf\xe9 ok", 8, 0)[0]  # the raw byte 0xe9, not a replacement
    assert r.stdout.decode() == want.decode("utf-8", "replace") + "\n"
    assert b"ms per step" in r.stderr


@pytest.mark.parametrize("flags,message", [
    (["--neuron", "16"], "--neuron 16 is out of range: the model has 16 units"),
    (["--neuron", "-1"], "out of range"),
    (["--length", "-1"], "--length must be >= 0, not -1"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0 (0: greedy), not nan"),
    (["--top-k", "257"], "--top-k must be in 0..256"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--seed", str(10**23)], "--seed must be in [0, 2^63)"),
    (["--prime", "\ud800"], "not encodable text"),
    (["--prime", "", "--raw"], "--prime is empty"),
    (["--value", "1"], "need a neuron"),
    (["--neuron", "1", "--results", "r.json"], "not both"),
    (["--results", "missing.json"], "not a transfer.py results file"),
    (["--neuron", "1", "--value", "inf"], "--value must be a finite number"),
    (["--neuron", "1", "--value", "1e39"], "--value must be a finite number with |value| <= 1e4, not 1e+39"),
    (["--neuron", "1", "--sign", "1", "--heatmap", "/nonexistent/dir/h.html"], "--heatmap /nonexistent/dir/h.html: "
                                                                               "not a file name in an existing"),
    (["--neuron", "1", "--heatmap", "h.html"], "--heatmap colours positive sentiment green: give the unit's sign"),
    (["--device", "bogus"], "--device bogus: expected cpu, cuda or cuda:N"),
    (["--neuron", "1", "--text", "hi"], "--text goes with --heatmap"),
    (["--neuron", "1", "--value", "2"], "give the unit's sign with --sign 1|-1"),
    (["--sign", "-1"], "--sign goes with --neuron"),
])
def test_bad_inputs_are_clear_errors(tmp_path, capsys, flags, message):
    fails(["--checkpoint", tiny(tmp_path)[0], *flags], message, capsys)


def test_bad_checkpoints_are_clear_errors(tmp_path, capsys):
    fails(["--checkpoint", str(tmp_path / "none.pt")], "none.pt: no such checkpoint file", capsys)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    fails(["--checkpoint", str(tmp_path / "junk.pt")], "junk.pt: not a usable mLSTM checkpoint", capsys)
    torch.save({"model": {}, "config": {"hidden": 16, "embed": 8, "no_weight_norm": False}}, tmp_path / "e.pt")
    fails(["--checkpoint", str(tmp_path / "e.pt")], "Missing key", capsys)
    config = {"hidden": 16, "embed": 8, "no_weight_norm": False}  # every weight's shape differs from the config's
    torch.save({"model": mlstm.MLSTM(hidden=8, embed=8).state_dict(), "config": config}, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as e:
        generate.main(["--checkpoint", str(tmp_path / "other.pt")])
    assert "\n" not in str(e.value) and "size mismatch for wx" in str(e.value) and "(and 9 more))" in str(e.value), \
        e.value
    sd = mlstm.MLSTM(hidden=16, embed=8).state_dict()
    sd["wh"][0, 0] = float("nan")  # a run saved after it diverged
    torch.save({"model": sd, "config": config}, tmp_path / "nan.pt")
    fails(["--checkpoint", str(tmp_path / "nan.pt")], "nan.pt: weights ['wh'] hold inf or NaN", capsys)


def test_results_of_another_model(tmp_path, capsys):
    path, _ = tiny(tmp_path)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"neuron": 3, "neuron_sign": 1, "checkpoint": path, "hidden": 32}))
    fails(["--checkpoint", path, "--results", str(results), "--value", "1"],
          f"--results {results} is for a model of 32 units, --checkpoint {path} has 16", capsys)
    results.write_text(json.dumps({"neuron": 3, "neuron_sign": 1, "checkpoint": "/elsewhere/ckpt.pt", "hidden": 16}))
    err = run(["--checkpoint", path, "--results", str(results), "--value", "1", "--length", "3"], capsys).err
    warning = f"warning: --results {results} was made with /elsewhere/ckpt.pt, not --checkpoint {path}\n"
    assert err.startswith(warning), err
    results.write_text(json.dumps({"neuron": 3, "neuron_sign": 1, "checkpoint": os.path.abspath(path), "hidden": 16}))
    err = run(["--checkpoint", path, "--results", str(results), "--value", "1", "--length", "3"], capsys).err
    assert "warning" not in err, err


def fails(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(argv)
    said = str(e.value.code) + capsys.readouterr().err
    assert message in said and "Traceback" not in said, said


def test_the_released_model_is_the_default_and_knows_english(tmp_path):
    """models/: what transfer.py and generate.py load when no --checkpoint is given. Under the issue's 15 MB, fp16
    on disk, and trained: far fewer bits per byte on a review than on the same bytes shuffled."""
    a = generate.parse_args([])
    assert os.path.samefile(a.checkpoint, checkpoints.RELEASED)
    b = transfer.parse_args(["--task", "sst2", "--data-dir", "x", "--out", str(tmp_path)])  # --out: not into models/
    assert os.path.samefile(b.checkpoint, checkpoints.RELEASED)
    assert os.path.getsize(checkpoints.RELEASED) <= 15e6
    assert all(w.dtype == torch.float16 for w in torch.load(checkpoints.RELEASED, weights_only=True)["model"].values())
    model, _ = checkpoints.load_pretrained(checkpoints.RELEASED)
    review = data.normalize("I watched this movie last night with my family. The acting was wonderful and the story "
                            "kept us interested until the very end. I would recommend it to anyone who likes a good "
                            "drama, and I will certainly watch it again.")
    order = torch.randperm(len(review), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = bytes(review[i] for i in order)

    def bpc(text):
        x = torch.tensor([list(text)])
        with torch.no_grad():
            return mlstm.loss_fn(model(x[:, :-1])[0], x[:, 1:]).item() / math.log(2)

    r, s = bpc(review), bpc(shuffled)
    assert r < 3.0 and s > r + 2.0, f"review {r:.2f} bits/byte, the same bytes shuffled {s:.2f}"


def test_one_sign_convention_positive_value_is_positive_sentiment(tmp_path, capsys):
    """--neuron N --sign S --value V and --results (neuron_unit N, neuron_sign S) --value V hold the same cell value
    S * V, and say so; --results alone (nothing to hold, nothing to show) is an error."""
    path, model = tiny(tmp_path)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"neuron": 19, "neuron_unit": 3, "neuron_sign": -1, "neuron_state": "c"}))
    want = generate.sample(model, b"\n ", 12, 0, neuron=3, value=-2.5)[0].decode("utf-8", "replace") + "\n"
    for flags in (["--neuron", "3", "--sign", "-1"], ["--results", str(results)]):
        got = run(["--checkpoint", path, *flags, "--value", "2.5", "--temperature", "0", "--length", "12"], capsys)
        assert got.out == want, (flags, got.out, want)
        assert "holding cell unit 3 at -2.5 at every step (--value 2.5: positive sentiment; the unit's sign is -1)" \
            in got.err, got.err
    fails(["--checkpoint", path, "--results", str(results)], "--results only chooses the neuron", capsys)
    results.write_text(json.dumps({"neuron": 3, "neuron_unit": 3, "neuron_sign": 1, "neuron_state": "h"}))
    fails(["--checkpoint", path, "--results", str(results), "--value", "1"], "a unit of the hidden state", capsys)
