"""Import the papers' released mLSTMs into this project's model file (the one train.py --export writes).

Radford et al. 2017 released their 4096-unit byte mLSTM as OpenAI's generating-reviews-discovering-sentiment
`model/` folder (15 numpy files, ~340 MB); NVIDIA's sentiment-discovery (Puri et al.'s group) released
PyTorch checkpoints of the same architecture. Both compute mlstm.py's equations; they differ in layout:

  OpenAI (files in the order its encoder.py loads them; weights stored [in, out] as ours):
    0 embedding [256, E]  1 wx [E, 4H]  2-5 wh as four [H, H] blocks joined along axis 1  6 wmx [E, H]
    7 wmh [H, H]  8 b [4H]  9 gx [4H]  10 gh [4H]  11 gmx [H]  12 gmh [H]  13 output weight [H, 256]
    14 output bias [256]; gates i f o u; weight norm l2_normalize(w, dim=0) * g per output unit: ours exactly.
  sentiment-discovery (torch.save of {'encoder': {'encoder': {'weight'}, 'rnn': {...}}, 'decoder': {...}}):
    rnn keys rnns.0.w_ih [4H, E], w_hh [4H, H], w_mih [H, E], w_mhh [H, H], b_ih, b_hh (the two biases add),
    weights [out, in] (F.linear); gates i f g o, g the tanh input (our u); with weight norm each weight is
    NAME_g [out, 1] and NAME_v, w = g v / ||v|| per output row; a vocabulary of 257 has id = byte + 1 (0 pads).

The format is told by the contents, not the name. The weights stay float32 (an fp16 copy would move the features
by ~1e-3); the output's config records the source, its format and its sha256.

    python tools/import_weights.py ~/generating-reviews-discovering-sentiment/model models/openai-4096.pt
    python tools/import_weights.py mlstm.pt models/nvidia-4096.pt      # a sentiment-discovery checkpoint
    python transfer.py --checkpoint models/openai-4096.pt --task sst2 --data-dir ../shared/data/sst2
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import numpy as np
import torch

from mlstm import MLSTM
from plumbing import cli
from plumbing.output_model import sha256
from plumbing.sources import DataError

OPENAI_FILES = [f"{k}.npy" for k in range(15)]


def checked(where, array, shape):
    """`array` as a float32 tensor, or a DataError naming `where` for a wrong shape or a non-finite value."""
    t = array.float() if isinstance(array, torch.Tensor) else torch.from_numpy(np.array(array, dtype=np.float32))
    if tuple(t.shape) != tuple(shape):
        raise DataError(f"{where}: shape {list(t.shape)}, expected {list(shape)}")
    if not t.isfinite().all():
        raise DataError(f"{where}: holds inf or NaN")
    return t


def from_openai(folder):
    """(our state dict, hidden, embed) from OpenAI's model/ folder: the names and layouts are ours already."""
    if missing := [f for f in OPENAI_FILES if not os.path.isfile(os.path.join(folder, f))]:
        raise DataError(f"{folder}: not OpenAI's model/ folder: no {', '.join(missing[:3])}"
                        + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""))
    p = []
    for f in OPENAI_FILES:
        try:  # memory-mapped: the 4096-unit files are read once, into the float32 tensors below
            p.append(np.load(os.path.join(folder, f), mmap_mode="r", allow_pickle=False))
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{os.path.join(folder, f)}: not a numpy array file ({e})") from None
    H, E = p[7].shape[0], p[0].shape[-1]  # wmh [H, H], embedding [256, E]
    at = lambda k: os.path.join(folder, OPENAI_FILES[k])  # noqa: E731
    wh = [checked(at(k), p[k], (H, H)) for k in range(2, 6)]
    sd = {"embed.weight": checked(at(0), p[0], (256, E)), "wx": checked(at(1), p[1], (E, 4 * H)),
          "wh": torch.cat(wh, 1),  # the four [H, H] blocks joined along axis 1, as encoder.py joins them
          "wmx": checked(at(6), p[6], (E, H)), "wmh": checked(at(7), p[7], (H, H)), "b": checked(at(8), p[8], (4 * H,)),
          "gx": checked(at(9), p[9], (4 * H,)), "gh": checked(at(10), p[10], (4 * H,)),
          "gmx": checked(at(11), p[11], (H,)), "gmh": checked(at(12), p[12], (H,)),
          "out.weight": checked(at(13), p[13], (H, 256)).t().contiguous(),  # [H, 256] -> nn.Linear's [256, H]
          "out.bias": checked(at(14), p[14], (256,))}
    return sd, H, E, True


def weights(d, name, where):
    """The weight NAME of state dict d as [out, in]: itself, or from its weight-norm pair NAME_g, NAME_v."""
    if name in d:
        return d[name].float(), None
    if name + "_g" in d and name + "_v" in d:
        g, v = d[name + "_g"].float(), d[name + "_v"].float()
        if g.numel() != v.shape[0]:
            raise DataError(f"{where}: {name}_g has {g.numel()} values for {v.shape[0]} rows of {name}_v")
        return v, g.reshape(-1)
    raise DataError(f"{where}: no {name} (nor {name}_g and {name}_v) in the checkpoint")


def gates_ifou(t):
    """sentiment-discovery's gate blocks i f g o (along dim 0) in our order i f o u (u = its g)."""
    i, f, g, o = t.chunk(4, 0)
    return torch.cat([i, f, o, g])


def from_sentiment_discovery(path, ckpt):
    """(our state dict, hidden, embed, weight norm) from a sentiment-discovery checkpoint dict."""
    rnn, enc, dec = ckpt["encoder"]["rnn"], ckpt["encoder"]["encoder"], ckpt["decoder"]
    if layers := sorted({k.split(".")[1] for k in rnn if k.startswith("rnns.")} - {"0"}):
        raise DataError(f"{path}: {len(layers) + 1} mLSTM layers; this model has one")
    r = {k[len("rnns.0."):]: v for k, v in rnn.items() if k.startswith("rnns.0.")}
    w = {n: weights(r, n, path) for n in ("w_ih", "w_hh", "w_mih", "w_mhh")}
    norm = {n for n, (_, g) in w.items() if g is not None}
    if norm and norm != set(w):
        raise DataError(f"{path}: weight norm on {sorted(norm)} only; expected all four recurrent weights or none")
    H, E = w["w_mhh"][0].shape[0], w["w_mih"][0].shape[1]
    emb, _ = weights(enc, "weight", path)
    out_w, _ = weights(dec, "weight", path)
    V = emb.shape[0]
    if V not in (256, 257):
        raise DataError(f"{path}: a vocabulary of {V}; expected 256 bytes (or 257: byte + 1, 0 the padding)")
    first = V - 256  # 257: id = byte + 1, so byte b is row b + 1
    bias = sum(r[n].float() for n in ("b_ih", "b_hh") if n in r)  # two biases that add (none: zero)
    sd = {"embed.weight": checked(f"{path}: encoder.weight", emb[first:], (256, E)),
          "out.weight": checked(f"{path}: decoder.weight", out_w[first:], (256, H)),
          "out.bias": checked(f"{path}: decoder.bias", dec["bias"].float()[first:] if "bias" in dec else
                              torch.zeros(256), (256,)),
          "b": checked(f"{path}: b_ih + b_hh", gates_ifou(torch.as_tensor(bias).expand(4 * H)), (4 * H,))}
    # ours are stored [in, out], gates i f o u; theirs [out, in], gates i f g o
    for ours, theirs, shape, gated in (("x", "w_ih", (4 * H, E), True), ("h", "w_hh", (4 * H, H), True),
                                       ("mx", "w_mih", (H, E), False), ("mh", "w_mhh", (H, H), False)):
        v, g = w[theirs]
        v = checked(f"{path}: {theirs}", v, shape)
        sd["w" + ours] = (gates_ifou(v) if gated else v).t().contiguous()
        if norm:
            g = checked(f"{path}: {theirs}_g", g, shape[:1])
            sd["g" + ours] = gates_ifou(g) if gated else g
    return sd, H, E, bool(norm)


def convert(src):
    """The model file's dict (model, config, step) for a released model at `src`: OpenAI's folder, or a
    sentiment-discovery checkpoint file. Anything else, a missing file or key, a wrong shape, a non-finite
    weight: a DataError naming the file and the problem."""
    if os.path.isdir(src):
        fmt, files = "openai", [os.path.join(src, f) for f in OPENAI_FILES]
        sd, H, E, wn = from_openai(src)
    elif os.path.isfile(src):
        fmt, files = "sentiment-discovery", [src]
        try:
            ckpt = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, truncated, a pickle of code
            raise DataError(f"{src}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get("encoder"), dict) and {"encoder", "rnn"} <=
                set(ckpt["encoder"]) and isinstance(ckpt.get("decoder"), dict)):
            what = "this project's model file already" if isinstance(ckpt, dict) and "config" in ckpt else \
                "neither OpenAI's model/ folder nor a sentiment-discovery checkpoint"
            raise DataError(f"{src}: {what} (a sentiment-discovery checkpoint holds encoder.encoder, encoder.rnn "
                            f"and decoder)")
        try:
            sd, H, E, wn = from_sentiment_discovery(src, ckpt)
        except (KeyError, AttributeError, TypeError, RuntimeError) as e:  # a key missing, a value not a tensor
            raise DataError(f"{src}: not a usable sentiment-discovery checkpoint ({type(e).__name__}: {e})") from None
    else:
        raise DataError(f"{src}: no such file or folder")
    with torch.device("meta"):  # the names and shapes MLSTM expects, without allocating them
        want = {k: tuple(v.shape) for k, v in MLSTM(hidden=H, embed=E, weight_norm=wn).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != want:  # a bug of this importer, not of the file: the checks above name the file's problems
        raise RuntimeError(f"import of {src}: state dict {got} does not fit MLSTM's {want}")
    config = dict(hidden=H, embed=E, no_weight_norm=not wn, dtype="fp32",
                  imported=dict(format=fmt, source=os.path.abspath(src), sha256=sha256(*files)))
    return dict(model=sd, config=config, step=None)


def main(a):
    out = convert(a.src)
    try:  # whole or not at all
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        torch.save(out, a.out + ".tmp")
        os.replace(a.out + ".tmp", a.out)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(a.out + ".tmp"):
            os.remove(a.out + ".tmp")
        raise SystemExit(f"error: cannot write {a.out} ({type(e).__name__}: {e})")
    c = out["config"]
    n = sum(v.numel() for v in out["model"].values())
    print(f"import: {a.src} ({c['imported']['format']}, {c['hidden']} units, embedding {c['embed']}, weight norm "
          f"{'on' if not c['no_weight_norm'] else 'off'}, {n:,} parameters, float32) -> {a.out}: "
          f"{os.path.getsize(a.out) / 2**20:.1f} MiB")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Convert a released mLSTM (OpenAI's model/ folder or a "
                                "sentiment-discovery checkpoint) into this project's model file (see the docstring).")
    p.add_argument("src", help="OpenAI's model/ folder (0.npy ... 14.npy), or a sentiment-discovery .pt checkpoint")
    p.add_argument("out", help="the model file to write (.pt): --checkpoint of transfer.py, classify.py, finetune.py, "
                   "tools/generate.py; --init of train.py")
    a = p.parse_args(argv)
    if os.path.abspath(a.src) == os.path.abspath(a.out):
        p.error("OUT would overwrite SRC")
    if os.path.isdir(a.out):
        p.error(f"OUT {a.out} is a folder; name the model file, e.g. {os.path.join(a.out, 'openai-4096.pt')}")
    cli.check_output_dir(p, "OUT", os.path.dirname(os.path.abspath(a.out)))  # created if need be
    return a


if __name__ == "__main__":
    args = parse_args()
    cli.main_guard(lambda: main(args), oom="importing the 4096-unit model takes about 1 GB of memory",
                   interrupted=f"interrupted: {args.out} not written")
