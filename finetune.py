"""Fine-tuning the pretrained mLSTM for sentiment, end to end (beyond the papers: ULMFiT, sentiment-discovery).

transfer.py keeps the language model fixed and fits a linear classifier on its features; here the mLSTM itself
learns. A linear head reads the text's hidden states pooled over its bytes (the last, the mean and the max side
by side: ULMFiT's concat pooling, transfer.py's `hidden-concat` feature), and the whole model is trained by Adam
at a small learning rate (linear warmup and decay, train.lr_at) on the labelled texts, optionally with the
auxiliary language-model loss that keeps it a language model (--lm-weight), in fp16/bf16 through fp16.py and
over several processes through distributed.py (each reads its rows of every global batch). Validation accuracy
is measured every --eval-every steps and the best weights kept; training ends after --patience evaluations
without a better one. The best is the output model --out/classifier.pt, which classify.py applies.

    python finetune.py --task sst2 --data-dir ../shared/data/sst2                 # the released model
    python finetune.py --task imdb --data-dir ../shared/data/imdb --limit 2000 --max-bytes 1024
    python finetune.py --checkpoint CKPT --train a.csv --test b.csv --lm-weight 0.5 --dtype bf16
    torchrun --standalone --nproc_per_node=2 finetune.py --task sst2 --data-dir ../shared/data/sst2
    python classify.py --model CKPT_DIR/finetune-sst2/classifier.pt "A gripping, funny film."

Texts are framed like the pretraining corpus (data.normalize) and, with --max-bytes, cut to their last bytes.
Writes to --out (default CKPT_DIR/finetune-TASK/): config.json, metrics.jsonl, classifier.pt, results.json.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import classify
import data
import distributed
import fp16
from data import SPLITS
from fast.loop import FastLoop
from mlstm import MLSTM, loss_fn, model_config
from plumbing import cli, labeled, output_model
from plumbing.checkpoints import RELEASED, load_pretrained
from plumbing.reports import write_file
from plumbing.run_folder import append_metrics, claimed, duration
from train import lr_at
from transfer import DEVICES, FEATURES, features, padded

HEAD_FEATURE = "hidden-concat"  # transfer.FEATURES: the last, mean and max of the hidden state


class Classifier(nn.Module):
    """The mLSTM with a linear head on its pooled hidden states: logit = head([h_last, mean_t h_t, max_t h_t])."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.loop = lm, FastLoop()  # the time loop train.py runs by default: a hand-written backward
        self.head = nn.Linear(len(FEATURES[HEAD_FEATURE]) * lm.hidden, 1)
        nn.init.zeros_(self.head.weight)  # p = 1/2 everywhere at first: the language model is not disturbed
        nn.init.zeros_(self.head.bias)

    def forward(self, x, lens, lm=False):
        """x: byte ids [B, T], right-padded; lens [B] >= 1. -> (logits [B], next-byte logits [B, T, 256] or None)."""
        hs, _, _ = self.lm.rnn(x, loop=self.loop)  # [B, T, H]
        # the feature the output model names, so classify.py computes the same (transfer.features)
        logits = self.head(features({"h": hs}, lens, HEAD_FEATURE)).squeeze(1)  # [B]
        return logits, self.lm.out(hs) if lm else None


def epoch_batches(lengths, batch_size, seed, epoch):
    """The index arrays of one epoch's global batches: a seeded shuffle, texts of similar length in one batch
    (sorted within pools of 50 batches: little padding), the batches in random order. Every batch is full; the
    texts left over this epoch fall elsewhere in the next one's shuffle."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))[: len(lengths) // batch_size * batch_size]
    lengths, batches = np.asarray(lengths), []
    for s in range(0, len(perm), 50 * batch_size):
        pool = perm[s : s + 50 * batch_size]
        pool = pool[np.argsort(lengths[pool], kind="stable")]
        batches += np.split(pool, len(pool) // batch_size)
    return [batches[i] for i in rng.permutation(len(batches))]


def lm_loss(logits, x, lens):
    """The auxiliary next-byte loss within each text: position t predicts byte t + 1, where both are the text's."""
    keep = torch.arange(x.shape[1] - 1, device=x.device) < (lens[:, None] - 1)  # [B, T-1]
    return loss_fn(logits[:, :-1][keep], x[:, 1:][keep]) if keep.any() else logits.sum() * 0


def as_output_model(clf_model, config, a, reported):
    """The fine-tuned classifier as an output model (plumbing/output_model.py): its own float32 mLSTM, the head on
    transfer.py's `hidden-concat` features (standardisation 0 and 1)."""
    w, b = clf_model.head.weight.detach().double().cpu()[0], float(clf_model.head.bias.detach().float())
    D = w.numel()
    return dict(kind="finetuned", feature=HEAD_FEATURE, dtype="fp32", batch_size=a.eval_batch_size,
                mean=torch.zeros(D), std=torch.ones(D),
                w=w, b=b, C=None, penalty=None, neuron=None, max_bytes=a.max_bytes,
                checkpoint=dict(path=os.path.abspath(a.checkpoint), sha256=output_model.sha256(a.checkpoint),
                                hidden=clf_model.lm.hidden),
                model={k: v.detach().float().cpu().clone() for k, v in clf_model.lm.state_dict().items()},
                config=config, reported=reported)


def accuracy(clf, texts, labels, d, batch_size):
    """The output model's accuracy on texts, as classify.py computes it, each process reading its share."""
    model = output_model.language_model(clf, "(fine-tuning)", device=d.device).eval()
    mine = slice(d.rank, None, d.world)
    logits, _, _ = classify.predict(clf, model, texts[mine], batch_size)
    counts = torch.tensor([float(((logits > 0) == (labels[mine] == 1)).sum()), float(len(logits))], device=d.device)
    right, n = distributed.all_reduce_mean(counts).tolist()
    return right / n


def finetune(a, d, log):
    splits = labeled.load_task(a)
    lm, config = load_pretrained(a.checkpoint)
    texts = {s: splits[s][0] for s in SPLITS}
    y = {s: splits[s][1] for s in SPLITS}
    cut = (lambda b: b[-a.max_bytes:]) if a.max_bytes else (lambda b: b)
    train_bytes = [cut(data.normalize(t)) for t in texts["train"]]
    if len(train_bytes) < a.batch_size:
        raise SystemExit(f"error: {len(train_bytes)} training texts are fewer than --batch-size {a.batch_size}")
    spe = len(train_bytes) // a.batch_size  # steps per epoch
    total = max(1, round(a.epochs * spe))
    log(f"finetune: {a.checkpoint} ({lm.hidden} units) on {d.device} x {d.world}, {a.dtype}; "
        + ", ".join(f"{s} {len(texts[s])}" for s in SPLITS) + f"; {total} steps of {a.batch_size} texts "
        f"({total / spe:.2f} epochs), lr {a.lr:g} (head x{a.head_lr_mult:g}), lm weight {a.lm_weight:g}")
    torch.manual_seed(a.seed)
    model = Classifier(lm).to(d.device)
    distributed.broadcast_params(model)
    mp = fp16.MixedPrecision(model, a.dtype)
    # Adam over the float32 masters, the head at --head-lr-mult times the language model's rate: it starts from zero
    groups = [[m for n, m in zip(mp.names, mp.masters) if n.startswith("head.") == head] for head in (False, True)]
    opt = torch.optim.Adam([{"params": g, "lr": torch.tensor(float(a.lr), device=d.device)} for g in groups],
                           fused=True)
    reduce = distributed.GradReducer()
    local = a.batch_size // d.world
    rows = slice(d.rank * local, (d.rank + 1) * local)
    masters = lambda: dict(zip(mp.names, (m.detach().float().cpu().clone() for m in mp.masters)))  # noqa: E731
    fp32 = Classifier(MLSTM(**model_config(config))).eval()  # the float32 model evaluated and saved

    def evaluate(split):
        fp32.load_state_dict(masters())
        clf = as_output_model(fp32, config, a, {})
        return accuracy(clf, np.array(texts[split], dtype=object), y[split], d, a.eval_batch_size), clf

    best, best_step, bad, since = -1.0, 0, 0, dict(loss=0.0, right=0, n=0, chars=0, t=time.time())
    t_start = time.time()
    for step in range(total):
        epoch, k = divmod(step, spe)
        if k == 0:
            order = epoch_batches([len(b) for b in train_bytes], a.batch_size, a.seed, epoch)
        idx = order[k][rows]
        x, lens = padded([train_bytes[i] for i in idx], d.device)
        target = torch.from_numpy(y["train"][idx]).float().to(d.device)
        lr = lr_at(step, a.lr, a.warmup, total)
        opt.param_groups[0]["lr"].copy_(lr)
        opt.param_groups[1]["lr"].copy_(lr * a.head_lr_mult)
        logits, lm_logits = model(x, lens, lm=a.lm_weight > 0)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        if a.lm_weight:
            loss = loss + a.lm_weight * lm_loss(lm_logits, x, lens)
        mp.backward(loss)
        mp.step(opt, a.clip, reduce)
        since["loss"] += float(loss.detach())
        since["right"] += int(((logits > 0) == (target == 1)).sum())
        since["n"], since["chars"] = since["n"] + 1, since["chars"] + int(lens.sum())
        if (step + 1) % a.log_every == 0 or step + 1 == total:
            mean = distributed.all_reduce_mean(torch.tensor([since["loss"] / since["n"], since["right"] / local /
                                                             since["n"], since["chars"]], device=d.device)).tolist()
            dt, sc = time.time() - since["t"], mp.state_dict()
            if not math.isfinite(mean[0]):
                raise SystemExit(f"error: fine-tuning diverged at step {step + 1} (loss {mean[0]}); lower --lr")
            eta = (total - step - 1) * (time.time() - t_start) / (step + 1)
            log(f"step {step + 1}/{total} | loss {mean[0]:.4f} | acc {mean[1]:.3f} | lr {float(lr):.2e} | "
                f"scale {sc['scale']:g} | skipped {sc['skipped']} | {1000 * dt / since['n']:.0f} ms | "
                f"{mean[2] * d.world / dt / 1e3:.3g}k chars/s | eta {duration(eta)}")
            if d.main:
                append_metrics(a.out, {"step": step + 1, "loss": mean[0], "train_acc": mean[1], "lr": float(lr)})
            since = dict(loss=0.0, right=0, n=0, chars=0, t=time.time())
        if (step + 1) % a.eval_every == 0 or step + 1 == total:
            t0 = time.time()
            val, clf = evaluate("val")
            better = val > best
            best, best_step, bad = (val, step + 1, 0) if better else (best, best_step, bad + 1)
            if better and d.main:
                output_model.save(a.classifier, {**clf, "reported": dict(task=a.task or "files", val_acc=val)})
            log(f"step {step + 1}/{total} | val acc {val:.4f}" + (" (best: saved)" if better else
                f" (best {best:.4f} at step {best_step})") + f" | {time.time() - t0:.0f}s")
            if d.main:
                append_metrics(a.out, {"step": step + 1, "val_acc": val})
            since["t"] += time.time() - t0  # evaluations stay out of the logged speed
            if bad >= a.patience:
                log(f"early stop: {bad} evaluations without a better validation accuracy")
                break
    # The best weights, as classify.py will read them from the saved file: their test accuracy.
    clf = output_model.load(a.classifier) if d.main else None
    distributed.barrier()
    if not d.main:
        clf = output_model.load(a.classifier)
    test = accuracy(clf, np.array(texts["test"], dtype=object), y["test"], d, a.eval_batch_size)
    res = dict(task=a.task or "files", checkpoint=os.path.abspath(a.checkpoint), hidden=lm.hidden,
               feature=HEAD_FEATURE, test_acc=test, val_acc=best, best_step=best_step, steps=step + 1,
               epochs=(step + 1) / spe, lr=a.lr, head_lr_mult=a.head_lr_mult, lm_weight=a.lm_weight,
               dtype=a.dtype, batch_size=a.batch_size,
               max_bytes=a.max_bytes, processes=d.world, seconds=round(time.time() - t_start, 1),
               classifier=os.path.abspath(a.classifier))
    if d.main:
        output_model.save(a.classifier, {**clf, "reported": dict(task=res["task"], val_acc=best, test_acc=test,
                                                                 train_acc=None)})
        write_file(os.path.join(a.out, "results.json"), json.dumps(res, indent=1))
    log(f"finetune: best validation accuracy {best:.4f} (step {best_step}); its test accuracy {test:.4f}; "
        f"-> {a.classifier}, {a.out}/results.json")
    return res


def main(a):
    d = distributed.setup(a.device, a.timeout)
    log = (lambda *m: print(*m, flush=True)) if d.main else (lambda *m: None)
    with claimed(a.out, d.main, log):
        if d.main:
            write_file(os.path.join(a.out, "config.json"), json.dumps(vars(a), indent=1))
            open(os.path.join(a.out, "metrics.jsonl"), "w").close()
        res = finetune(a, d, log)
    distributed.cleanup()
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune the pretrained mLSTM for sentiment (see the docstring).",
                                formatter_class=cli.Help)
    p.add_argument("--checkpoint", default=os.path.relpath(RELEASED), help="train.py checkpoint or released model")
    labeled.add_task_arguments(p)
    p.add_argument("--max-bytes", type=int, help="cut every text to its last N bytes (long reviews; default: whole)")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the training texts, at most")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (texts), over all processes")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of Adam")
    p.add_argument("--head-lr-mult", type=float, default=1.0, help="the head's learning rate over --lr")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--lm-weight", type=float, default=0.0, help="weight of the auxiliary next-byte loss (0: none)")
    p.add_argument("--dtype", choices=list(fp16.DTYPES), default="fp32", help="compute precision (bf16 where the "
                   "CPU has bf16 matrix units; fp16 on GPUs)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation accuracies")
    p.add_argument("--patience", type=int, default=3, help="evaluations without a better one before stopping")
    p.add_argument("--eval-batch-size", type=int, default=128, help="texts read at once when evaluating, in float32 "
                   "(recorded in the output model: classify.py reads with the same and gets the same numbers)")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--seed", type=int, default=0, help="seed of the head, the batches, the carved validation")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--timeout", type=float, default=600, help="seconds a process waits for the others")
    p.add_argument("--out", help="output folder (default: CHECKPOINT_DIR/finetune-TASK)")
    a = p.parse_args(argv)
    labeled.check_task_arguments(p, a)
    cli.require(p, a, ("max_bytes", "batch_size", "eval_every", "patience", "eval_batch_size",
                       "log_every"), lambda v: 1 <= v < 2**62, ">= 1")
    cli.require(p, a, ("warmup", "seed"), lambda v: 0 <= v < 2**62, ">= 0")
    cli.require(p, a, ("epochs", "lr", "head_lr_mult"), lambda v: 0 < v < math.inf, "> 0 and finite")
    cli.require(p, a, ("clip", "lm_weight"), lambda v: 0 <= v < math.inf, ">= 0 and finite")
    cli.require(p, a, ("timeout",), lambda v: 0 < v < 1e9, "> 0 and below 1e9 seconds")
    if a.device != "auto" and (why := cli.device_problem(a.device, DEVICES)):
        p.error(why)
    if not os.path.isfile(a.checkpoint):
        p.error(f"--checkpoint {a.checkpoint}: no such file")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if a.batch_size % world:
        p.error(f"--batch-size {a.batch_size} is not divisible by the {world} processes")
    a.out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)), f"finetune-{a.task or 'files'}")
    a.classifier = os.path.join(a.out, "classifier.pt")
    return a


if __name__ == "__main__":
    args = parse_args()
    cli.main_guard(lambda: main(args), oom="lower --batch-size or --max-bytes",
                   interrupted="interrupted: the best classifier so far, if any, is in --out/classifier.pt")
