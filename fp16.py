"""Mixed-precision training by hand: FP32 master weights, dynamic loss scaling, FP32 loss.

Puri et al. 2018 (arXiv 1808.01371), "Scaling training - Volta tensor cores" and "FP16 underflow /
Loss scaling" (after Micikevicius et al. 2017): the model computes in half precision on tensor cores,
the optimizer updates a float32 master copy of every weight, the loss is multiplied by a scale S
so that small gradients do not flush to zero in fp16, and steps whose gradients overflow are skipped
while S is halved. Also bf16: float32's range in 16 bits, so masters but no scaling.

    python train.py --dtype fp16 [--loss-scale 65536 | --static-loss-scale 1024] [--scale-growth 1000]
    python train.py --dtype bf16
"""
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class MixedPrecision:
    """Wraps a float32 model: converts it to `dtype` for compute and keeps float32 masters.

    Each step: backward(loss) scales the loss; step(optimizer) checks all gradients once for inf/NaN,
    skips the step on overflow (and halves S), else unscales into the master gradients, clips them,
    steps the optimizer (built over .masters) and copies the masters back into the compute model.
    For fp32 the masters are the model's own parameters and S = 1: the same loop, no copies.
    """

    def __init__(self, model, dtype="fp32", init_scale=2.0**16, growth_interval=1000, dynamic=True):
        self.dtype = dtype
        self.names = [n for n, _ in model.named_parameters()]
        self.params = list(model.parameters())
        if dtype == "fp32":
            self.masters = self.params
        else:
            self.masters = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
            model.to(DTYPES[dtype])  # converts in place: self.params now hold the half-precision copy
        self.scaling = dtype == "fp16"  # bf16 has float32's exponent range: nothing to rescue
        self.scale = float(init_scale) if self.scaling else 1.0
        self.dynamic, self.growth_interval = dynamic, growth_interval
        self.good_steps = 0  # consecutive steps without overflow, since the last change of S
        self.skipped = 0

    def backward(self, loss):
        """Backward of loss * S; the loss is a float32 scalar (the softmax ran in float32)."""
        (loss.float() * self.scale).backward()

    @torch.no_grad()
    def step(self, optimizer, clip=0.0, reduce_grads=None):
        """One optimizer step, or a skip on overflow. reduce_grads(params), when given, all-reduces
        the compute gradients first, so every rank sees the same inf/NaN and skips the same steps.
        Returns (grad_norm of the unscaled gradients before clipping, whether the step was taken)."""
        for p in self.params:
            if p.grad is None:  # a parameter that got no gradient still takes part in the reduction
                p.grad = torch.zeros_like(p)
        if reduce_grads is not None:
            reduce_grads(self.params)
        if self.masters is not self.params:
            for m, p in zip(self.masters, self.params):
                m.grad = p.grad.float()
        grads = [m.grad for m in self.masters]
        if self.scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / self.scale)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        # The one check of all gradients: an inf or NaN anywhere makes the global norm non-finite.
        # (bool() is the step's only host sync.)
        if not bool(torch.isfinite(norm)):
            self.skipped += 1
            self.good_steps = 0
            if self.scaling and self.dynamic:
                self.scale = max(1.0, self.scale / 2)
            self.zero_grad()
            return norm, False
        if clip > 0:
            torch._foreach_mul_(grads, torch.clamp(clip / (norm + 1e-6), max=1.0))
        optimizer.step()
        if self.masters is not self.params:
            torch._foreach_copy_([p.data for p in self.params], [m.data for m in self.masters])
        self.zero_grad()
        self.good_steps += 1
        if self.scaling and self.dynamic and self.good_steps == self.growth_interval:
            self.scale *= 2
            self.good_steps = 0
        return norm, True

    def zero_grad(self):
        for p in self.params + (self.masters if self.masters is not self.params else []):
            p.grad = None

    def master_state_dict(self):
        """The float32 weights under the model's parameter names: what a checkpoint stores."""
        return {n: m.detach().float() for n, m in zip(self.names, self.masters)}

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, sd):
        self.scale, self.good_steps, self.skipped = float(sd["scale"]), int(sd["good_steps"]), int(sd["skipped"])
