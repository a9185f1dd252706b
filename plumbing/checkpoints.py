"""Checkpoint files: train.py's resumable checkpoints, released models, and the checks that make both safe.

A checkpoint is a dict of state dicts (float32 master weights, optimizer, loss scaler, step, the carried
state, RNG, config), never a pickled module: written to a temporary file, fsynced, then renamed into place
(the previous one kept as ckpt.prev.pt), and read with torch.load(weights_only=True) after every zip entry's
CRC-32 is checked. A released model (train.py --export) is the fp16 weights with the config and step.

    python train.py --out out/demo --resume                   # continue from out/demo/ckpt.pt
    python train.py --out out/demo --export demo.pt           # a released model
"""
import contextlib
import os
import zipfile

import torch

import distributed
from mlstm import MLSTM, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The released model (README): transfer.py's and tools/generate.py's default checkpoint.
RELEASED = os.path.join(ROOT, "models", "mlstm1024-imdb.pt")
# Flags that steer one invocation but not the computation: they may change on --resume (a run folder may move).
RUN_FLAGS = {"resume", "export", "stop_at", "log_every", "eval_every", "eval_iters", "save_every", "sample_chars",
             "device", "timeout", "out", "cache_dir", "cuda_graph", "triton", "recompute", "allow_binary", "init",
             "reference_loop"}


def read_checkpoint(path, device="cpu"):
    """torch.load(weights_only=True) of a file whose every zip entry passed its CRC-32 check.

    torch.load does not check the CRC-32s of torch.save's zip entries: a flipped bit would load silently
    as a different weight. weights_only: a checkpoint is data, never code to run."""
    try:
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()
    except zipfile.BadZipFile:
        raise ValueError("not torch.save's zip format (a foreign file, or torch's legacy format: torch.load it and "
                         "torch.save it again)") from None
    if damaged:
        raise ValueError(f"CRC-32 mismatch in {damaged}: the file is corrupted")
    return torch.load(path, map_location=device, weights_only=True)


def load_pretrained(path, device="cpu"):
    """(model, config) from a train.py checkpoint or a released model (train.py --export); clear errors
    instead of deep tracebacks. Weights stored in fp16 are loaded into the fp32 model."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such checkpoint file")
    try:
        ckpt = read_checkpoint(path, device)
        model = MLSTM(**model_config(ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # a truncated or corrupted file, a pickle with code in it, another model's weights
        lines = [s.strip() for s in str(e).splitlines() if s.strip()] or [""]
        why = lines[0]  # one line; load_state_dict's first ends in ":" and lists one mismatched weight per line
        if why.endswith(":") and len(lines) > 1:
            why += f" {lines[1]}" + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
        raise SystemExit(f"error: {path}: not a usable mLSTM checkpoint ({type(e).__name__}: {why})")
    bad = [k for k, v in model.state_dict().items() if not v.isfinite().all()]
    if bad:  # a run saved after it diverged: every output would be NaN
        raise SystemExit(f"error: {path}: weights {bad} hold inf or NaN")
    return model.to(device), ckpt["config"]


def save_checkpoint(path, ckpt):
    """Write to a temporary file, keep the previous checkpoint as .prev, then rename into place.

    A process killed at any point leaves ckpt.pt or ckpt.prev.pt complete (load_checkpoint takes the first
    readable one). A failed write (disk full) removes the partial file, leaves ckpt.pt as it was and exits."""
    tmp, prev = path + ".tmp", path[:-3] + ".prev.pt"
    rotated = False
    try:
        torch.save(ckpt, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.replace(path, prev)
            rotated = True
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):  # put the good checkpoint back where it was
            if rotated:
                os.replace(prev, path)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise SystemExit(f"error: cannot write the checkpoint {path} ({type(e).__name__}: {e}); the previous "
                         f"checkpoint, if any, is left as it was (resume with --resume once there is room)")


def load_checkpoint(out, config, log, main=True):
    """The newest readable checkpoint in `out` (ckpt.pt, else ckpt.prev.pt), checked against config.

    Every entry's CRC-32 is checked first (read_checkpoint): a flipped bit is not a different weight.
    An unreadable ckpt.pt is renamed ckpt.pt.corrupt (by the main process), so that the next save does not
    rotate it over the good ckpt.prev.pt. Checkpoints present but none usable: an error, not a fresh start."""
    bad = []
    for path in (os.path.join(out, "ckpt.pt"), os.path.join(out, "ckpt.prev.pt")):
        if not os.path.exists(path):
            continue
        try:
            ckpt = read_checkpoint(path)
            missing = {"model", "optimizer", "scaler", "step", "state", "rng", "config"} - set(ckpt)
            if missing or not isinstance(ckpt["config"], dict):
                raise KeyError(f"not a train.py checkpoint: no {sorted(missing) or 'config dict'}")
            diff = {k: (ckpt["config"].get(k), v) for k, v in config.items()
                    if k not in RUN_FLAGS and ckpt["config"].get(k) != v}
            if diff:
                raise SystemExit(f"error: {path} was trained with another configuration; differences "
                                 f"(checkpoint vs command): {diff}. Use another --out or the same flags.")
            with torch.device("meta"):  # the shapes the configuration makes, without allocating them
                want = {k: tuple(v.shape) for k, v in MLSTM(**model_config(config)).state_dict().items()}
            got = {k: tuple(getattr(v, "shape", ())) for k, v in ckpt["model"].items()}
            if got != want:
                raise ValueError(f"its weights do not fit its configuration: "
                                 f"{sorted(set(got.items()) ^ set(want.items()))[:4]}")
        except Exception as e:  # truncated, corrupted, a pickle that would run code, a foreign file
            bad.append(f"{path}: {type(e).__name__}: {str(e)[:200]}")
            log(f"warning: {path} is unusable ({type(e).__name__}: {str(e)[:200]}); trying the previous one")
            if main and path.endswith("ckpt.pt"):
                try:
                    os.replace(path, path + ".corrupt")
                    log(f"warning: moved it to {path}.corrupt")
                except OSError:
                    pass
            continue
        log(f"resuming from {path} at step {ckpt['step']}")
        return ckpt
    if bad:
        raise SystemExit(f"error: --resume: no usable checkpoint in {out} ({'; '.join(bad)}). Move them away "
                         f"to start afresh.")
    log(f"--resume: no checkpoint in {out} yet: starting at step 0")  # a first start under torchrun --max-restarts
    return None


def training_checkpoint(mp, opt, step, state, cfg):
    """What train.py saves at `step`: the float32 masters, Adam's state, the loss scaler, every rank's rows of the
    carried state (gathered: call it on every rank), the RNG and the config."""
    full = [distributed.gather_rows(s.float()).cpu() for s in state]
    return {"model": mp.master_state_dict(), "optimizer": opt.state_dict(), "scaler": mp.state_dict(),
            "step": step, "state": full, "rng": torch.get_rng_state(), "config": cfg}


def restore(ckpt, opt, mp, rows, device, dtype):
    """Put a train.py checkpoint's optimizer, loss scaler and RNG back; -> (step, this process's `rows` of the
    carried state in `dtype`). The weights are loaded into the model before it is wrapped in fp16.MixedPrecision."""
    # Adam's moments and step counts resume; its settings are this run's: the device lr tensor and the fused
    # flag (a checkpoint from before fused Adam holds a float lr and no flag).
    saved = ckpt["optimizer"]["param_groups"]
    groups = [{**g, "params": s["params"]} for g, s in zip(opt.state_dict()["param_groups"], saved)]
    opt.load_state_dict({"state": ckpt["optimizer"]["state"], "param_groups": groups})
    mp.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"], tuple(s[rows].to(device, dtype) for s in ckpt["state"])


def export(out, path, log=print):
    """A released model: --out's checkpoint's weights in fp16 with its config and step, nothing to resume with.

    fp16 halves the file; its rounding (at most 2^-11 relative per weight) left a 512-unit model's held-out
    BPC unchanged to 6 digits (1.634526 from the fp32 checkpoint and from its export, 2026-11-26)."""
    src = os.path.join(out, "ckpt.pt")
    try:
        ckpt = read_checkpoint(src)
        weights = {k: v.half() for k, v in ckpt["model"].items()}
        config, step = ckpt["config"], ckpt["step"]
    except Exception as e:  # none yet, truncated, corrupted, a foreign file
        raise SystemExit(f"error: --export: {src} is not a usable train.py checkpoint ({type(e).__name__}: "
                         f"{str(e)[:200]})")
    if not all(w.isfinite().all() for w in weights.values()):
        raise SystemExit(f"error: --export: {src} has weights beyond fp16's range")
    if os.path.lexists(path):  # only an earlier export is written over
        try:
            held = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise SystemExit(f"error: --export: {path} exists and is not a model file to replace ({type(e).__name__}); "
                             f"remove it or export to another path")
        if not isinstance(held, dict) or "optimizer" in held:
            raise SystemExit(f"error: --export: {path} is a train.py checkpoint (it holds an optimizer state); "
                             f"export to another path")
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save({"model": weights, "config": config, "step": step}, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports an unwritable path as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise SystemExit(f"error: --export: cannot write {path} ({type(e).__name__}: {e})")
    log(f"export: {src} (step {step}, hidden {config['hidden']}) -> {path}: fp16 weights, "
        f"{os.path.getsize(path) / 2**20:.1f} MiB")
