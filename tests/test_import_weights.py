"""tools/import_weights.py: the released models' two on-disk formats, written here at small H, imported, and read
by mlstm.py, against independent forwards written from each source's own equations (OpenAI's in numpy with its
four wh files joined and its l2_normalize weight norm; sentiment-discovery's with F.linear on [out, in] weights,
gates i f g o and two biases, with and without weight norm, with a vocabulary of 256 and of 257). Bad files get
one clear line. train.py --init starts from an imported model. The real OpenAI model, where MLSTM_OPENAI_MODEL
names its folder, gives the sentiment unit's published values."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import train
import transfer
from mlstm import loss_fn
from plumbing.checkpoints import load_pretrained
from plumbing.sources import DataError
from tools import import_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, E = 8, 5
TEXTS = [b"\n a ", b"\n it was a great day ", b"\n It was such a bad bad bad day, \xe2\x80\x94 truly. "]
TOL = 1e-5  # float32 against float64 over at most 45 steps of a tiny model


def openai_params(seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.normal(0, 0.5, shape).astype(np.float32)  # noqa: E731
    return [r(256, E), r(E, 4 * H), r(H, H), r(H, H), r(H, H), r(H, H), r(E, H), r(H, H), r(4 * H),
            np.abs(r(4 * H)) + 0.5, np.abs(r(4 * H)) + 0.5, np.abs(r(H)) + 0.5, np.abs(r(H)) + 0.5, r(H, 256), r(256)]


def write_openai(folder, params):
    os.makedirs(folder, exist_ok=True)
    for k, p in enumerate(params):
        np.save(os.path.join(folder, f"{k}.npy"), p)
    return str(folder)


def openai_forward(p, byte_string):
    """OpenAI's encoder.py mlstm() in numpy float64: (final cell state, next-byte logits after the last byte)."""
    p = [x.astype(np.float64) for x in p]
    l2n = lambda w, g: w / np.sqrt(np.maximum((w * w).sum(0, keepdims=True), 1e-12)) * g  # noqa: E731
    wx, wmx, wmh = l2n(p[1], p[9]), l2n(p[6], p[11]), l2n(p[7], p[12])
    wh = l2n(np.concatenate(p[2:6], axis=1), p[10])  # the four files joined along axis 1, as encoder.py does
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    c = h = np.zeros(H)
    for byte in byte_string:
        x = p[0][byte]
        m = (x @ wmx) * (h @ wmh)
        i, f, o, u = np.split(x @ wx + m @ wh + p[8], 4)
        c = sig(f) * c + sig(i) * np.tanh(u)
        h = sig(o) * np.tanh(c)
    return c, h @ p[13] + p[14]


def sentiment_discovery_ckpt(seed=0, vocab=257, weight_norm=True, biases=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.5  # noqa: E731
    rnn = {}
    for name, shape in (("w_ih", (4 * H, E)), ("w_hh", (4 * H, H)), ("w_mih", (H, E)), ("w_mhh", (H, H))):
        if weight_norm:
            rnn[f"rnns.0.{name}_g"], rnn[f"rnns.0.{name}_v"] = r(shape[0], 1).abs() + 0.5, r(*shape)
        else:
            rnn[f"rnns.0.{name}"] = r(*shape)
    if biases:
        rnn["rnns.0.b_ih"], rnn["rnns.0.b_hh"] = r(4 * H), r(4 * H)
    return {"encoder": {"encoder": {"weight": r(vocab, E)}, "rnn": rnn},
            "decoder": {"weight": r(vocab, H), "bias": r(vocab)}}


def sentiment_discovery_forward(ckpt, byte_string):
    """sentiment-discovery's mLSTMCell (F.linear, gates i f g o, b_ih + b_hh) in float64, ids byte + 1 for a
    vocabulary of 257: (final cell state, the 256 bytes' logits after the last byte)."""
    rnn = {k[len("rnns.0."):]: v.double() for k, v in ckpt["encoder"]["rnn"].items()}

    def w(name):  # apex's weight norm: g v / ||v||, one norm per output row
        return rnn[name] if name in rnn else rnn[name + "_v"] * (rnn[name + "_g"] / rnn[name + "_v"].norm(dim=1,
                                                                                                       keepdim=True))
    emb, dec = ckpt["encoder"]["encoder"]["weight"].double(), {k: v.double() for k, v in ckpt["decoder"].items()}
    shift = emb.shape[0] - 256
    h = c = torch.zeros(1, H, dtype=torch.float64)
    for byte in byte_string:
        x = emb[byte + shift][None]
        m = F.linear(x, w("w_mih")) * F.linear(h, w("w_mhh"))
        gates = F.linear(x, w("w_ih"), rnn.get("b_ih")) + F.linear(m, w("w_hh"), rnn.get("b_hh"))
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    return c[0].numpy(), F.linear(h, dec["weight"], dec["bias"])[0, shift:].numpy()


def ours(path, byte_string):
    """mlstm.py reading the imported file through load_pretrained, as every script does."""
    model, _ = load_pretrained(path)
    with torch.no_grad():
        logits, (_, c) = model(torch.tensor(list(byte_string))[None])
    return c[0].double().numpy(), logits[0, -1].double().numpy()


def imported(tmp_path, src):
    out = str(tmp_path / "imported.pt")
    import_weights.main(import_weights.parse_args([str(src), out]))
    return out


def assert_same_forward(path, reference):
    for t in TEXTS:
        (c, logits), (rc, rlogits) = ours(path, t), reference(t)
        diff = max(np.abs(c - rc).max(), np.abs(logits - rlogits).max())
        assert diff < TOL, f"{t!r}: cell state and logits differ from the source's equations by {diff:.2e}"


def test_openai_folder_matches_its_own_equations(tmp_path, capsys):
    p = openai_params()
    path = imported(tmp_path, write_openai(tmp_path / "model", p))
    assert_same_forward(path, lambda t: openai_forward(p, t))
    config = torch.load(path, weights_only=True)["config"]
    assert config["imported"]["format"] == "openai" and len(config["imported"]["sha256"]) == 64, config
    assert config["hidden"] == H and config["embed"] == E and not config["no_weight_norm"], config
    assert all(v.dtype == torch.float32 for v in torch.load(path, weights_only=True)["model"].values())
    assert "openai, 8 units" in capsys.readouterr().out


@pytest.mark.parametrize("vocab", [256, 257])
@pytest.mark.parametrize("weight_norm", [True, False])
def test_sentiment_discovery_checkpoint_matches_its_own_equations(tmp_path, vocab, weight_norm):
    ckpt = sentiment_discovery_ckpt(vocab=vocab, weight_norm=weight_norm)
    torch.save(ckpt, tmp_path / "sd.pt")
    path = imported(tmp_path, tmp_path / "sd.pt")
    assert_same_forward(path, lambda t: sentiment_discovery_forward(ckpt, t))
    config = torch.load(path, weights_only=True)["config"]
    assert config["imported"]["format"] == "sentiment-discovery" and config["no_weight_norm"] == (not weight_norm)


def test_a_sentiment_discovery_checkpoint_without_biases(tmp_path):
    ckpt = sentiment_discovery_ckpt(biases=False)
    torch.save(ckpt, tmp_path / "sd.pt")
    assert_same_forward(imported(tmp_path, tmp_path / "sd.pt"), lambda t: sentiment_discovery_forward(ckpt, t))


def broken_openai(tmp_path, k, value):
    p = openai_params()
    p[k] = value
    folder = write_openai(tmp_path / f"model{k}", p)
    return folder


@pytest.mark.parametrize("make, message", [
    (lambda t: write_openai(t / "m", openai_params()[:14]), "not OpenAI's model/ folder: no 14.npy"),
    (lambda t: broken_openai(t, 3, np.zeros((H, H + 1), np.float32)), "3.npy: shape [8, 9], expected [8, 8]"),
    (lambda t: broken_openai(t, 8, np.full(4 * H, np.nan, np.float32)), "8.npy: holds inf or NaN"),
    (lambda t: (t / "x.pt").write_bytes(b"not a checkpoint") and str(t / "x.pt"), "not a readable torch checkpoint"),
    (lambda t: torch.save({"weights": torch.zeros(3)}, t / "x.pt") or str(t / "x.pt"),
     "neither OpenAI's model/ folder nor a sentiment-discovery checkpoint"),
    (lambda t: torch.save({"model": {}, "config": {}}, t / "x.pt") or str(t / "x.pt"), "this project's model file"),
    (lambda t: torch.save(dict(sentiment_discovery_ckpt(), decoder={"bias": torch.zeros(257)}), t / "x.pt")
     or str(t / "x.pt"), "no weight (nor weight_g and weight_v)"),
    (lambda t: torch.save(sentiment_discovery_ckpt(vocab=300), t / "x.pt") or str(t / "x.pt"), "a vocabulary of 300"),
    (lambda t: str(t / "nothing"), "no such file or folder"),
])
def test_bad_sources_get_one_clear_line(tmp_path, make, message):
    src = make(tmp_path)
    with pytest.raises(DataError, match=re.escape(message)):
        import_weights.convert(src)


def test_two_layers_and_the_command_line(tmp_path):
    ckpt = sentiment_discovery_ckpt()
    ckpt["encoder"]["rnn"].update({k.replace("rnns.0.", "rnns.1."): v for k, v in ckpt["encoder"]["rnn"].items()})
    torch.save(ckpt, tmp_path / "two.pt")
    p = subprocess.run([sys.executable, "tools/import_weights.py", str(tmp_path / "two.pt"), str(tmp_path / "o.pt")],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr == f"error: {tmp_path / 'two.pt'}: 2 mLSTM layers; this model has one\n", \
        p.stderr
    assert not os.path.exists(tmp_path / "o.pt") and not os.path.exists(tmp_path / "o.pt.tmp")


def test_the_imported_model_works_in_transfer_and_as_train_init(tmp_path):
    """The imported file as --checkpoint of transfer.py (and so of classify.py) and as --init of train.py: one
    training step from it equals one step of the same weights loaded by hand."""
    path = imported(tmp_path, write_openai(tmp_path / "model", openai_params()))
    rows = "".join(f"{k % 2},{'great fine good' if k % 2 else 'awful bad poor'} film {k}\n" for k in range(40))
    (tmp_path / "t.csv").write_text("label,text\n" + rows)
    res = transfer.run(transfer.parse_args(["--checkpoint", path, "--train", str(tmp_path / "t.csv"), "--test",
                                            str(tmp_path / "t.csv"), "--device", "cpu", "--bow-vocab", "0"]),
                       log=lambda *a: None)
    assert res["hidden"] == H and 0 <= res["neuron_unit"] < H

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {k} of some text to adapt the model to\n" for k in range(100)))
    argv = ["--data", str(corpus), "--cache-dir", str(tmp_path / "prep"), "--out", str(tmp_path / "run"),
            "--init", path, "--batch-size", "4", "--seq-len", "8", "--iters", "1", "--log-every", "1",
            "--save-every", "1", "--eval-every", "1000", "--sample-chars", "0", "--device", "cpu", "--lr", "1e-3"]
    cfg = train.parse_args(argv)
    assert (cfg["hidden"], cfg["embed"]) == (H, E)
    train.main(cfg)
    stepped = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]

    model, _ = load_pretrained(path)  # by hand: batch 0 of the loader, Adam at the full lr, clip 1
    loader = data.ByteLoader(os.path.join(data.resolve(str(corpus), str(tmp_path / "prep")), "train.bin"), 4, 8)
    x, y = (torch.from_numpy(a) for a in loader.batch(0))
    opt = torch.optim.Adam(model.parameters(), lr=train.scaled_lr(1e-3, "none", 4))
    logits, _ = model(x, model.zero_state(4))
    loss_fn(logits, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    diff = max((stepped[k] - v).abs().max().item() for k, v in model.state_dict().items())
    assert diff < 1e-6, f"one step from --init differs from one step by hand by {diff:.2e}"
    assert any((stepped[k] - v).abs().max() > 0 for k, v in load_pretrained(path)[0].state_dict().items())


@pytest.mark.parametrize("flag, value", [("--hidden", "16"), ("--embed", "64")])
def test_init_refuses_a_conflicting_shape(tmp_path, capsys, flag, value):
    path = imported(tmp_path, write_openai(tmp_path / "model", openai_params()))
    with pytest.raises(SystemExit):
        train.parse_args(["--init", path, flag, value])
    assert f"{flag} {value} conflicts with --init {path}" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("MLSTM_OPENAI_MODEL"), reason="set MLSTM_OPENAI_MODEL to OpenAI's model/ folder")
def test_the_real_openai_model_gives_the_published_sentiment_unit_values(tmp_path):
    """Unit 2388's final cell state as printed on generating-reviews-discovering-sentiment's tracker (issue 21,
    model.transform): each text framed as that encoder frames it ('\\n ' + text + ' ', data.normalize), the cell
    state after its last byte. Not run where this was written (the weights are not in this repository)."""
    path = imported(tmp_path, os.environ["MLSTM_OPENAI_MODEL"])
    model, _ = load_pretrained(path)
    texts = {"it was a great day": 0.371533, "it was a bad day": -0.499269, "It was such a bad bad bad day": -1.04497}
    got = transfer.featurize(model, [data.normalize(t) for t in texts], "cell")[:, 2388]
    diff = np.abs(got - np.array(list(texts.values()))).max()
    assert diff < 1e-3, f"unit 2388: {dict(zip(texts, got))}, published {texts}; max difference {diff:.2e}"
