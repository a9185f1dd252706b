"""Mixed-precision training by hand: FP32 master weights, dynamic loss scaling, FP32 loss.

Puri et al. 2018 (arXiv 1808.01371), "Scaling training - Volta tensor cores" and "FP16 underflow /
Loss scaling" (after Micikevicius et al. 2017): the model computes in half precision on tensor cores,
the optimizer updates a float32 master copy of every weight, the loss is multiplied by a scale S
so that small gradients do not flush to zero in fp16, and steps whose gradients overflow are skipped
while S is halved. Also bf16: float32's range in 16 bits, so masters but no scaling. The overflow check,
the skip and the change of S are tensor ops on the GPU, so that the host need not wait for it in a step.

    python train.py --dtype fp16 [--loss-scale 65536] [--static-loss-scale] [--scale-growth 1000]
    python train.py --dtype bf16
    python tools/grad_histogram.py --grad-histogram out/demo/ckpt.pt   # gradients against fp16's range
"""
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class MixedPrecision:
    """Wraps a float32 model: converts it to `dtype` for compute and keeps float32 masters.

    Each step: backward(loss) scales the loss; step(optimizer) unscales the gradients into the master
    gradients, checks them all at once for inf/NaN (through their global norm), clips them, and steps the
    optimizer (built over .masters), or skips the step on overflow and halves S; then it copies the masters
    back into the compute model.
    For fp32 the masters are the model's own parameters and S = 1: the same loop, no copies.

    The scale, the count of good steps since S last changed and the count of skipped steps are tensors on
    the model's device, updated by tensor ops: with an optimizer that skips on the device (fused Adam, as
    train.py builds it), a step need not wait for the GPU. Read them with float()/int() when logging.
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
        device = self.params[0].device
        self.scale = torch.tensor(float(init_scale) if self.scaling else 1.0, device=device)
        self.dynamic, self.growth_interval = dynamic, growth_interval
        self.good_steps = torch.zeros((), dtype=torch.long, device=device)  # since the last change of S
        self.skipped = torch.zeros((), dtype=torch.long, device=device)

    def optimizer(self, lr):
        """Adam over the masters, fused: one kernel for all tensors, and it skips on a device-side flag."""
        return torch.optim.Adam(self.masters, lr=torch.tensor(float(lr), device=self.scale.device), fused=True)

    def backward(self, loss):
        """Backward of loss * S; the loss is a float32 scalar (the softmax ran in float32)."""
        (loss.float() * self.scale).backward()

    @torch.no_grad()
    def step(self, optimizer, clip=0.0, reduce_grads=None):
        """One optimizer step, or a skip on overflow. reduce_grads(params), when given, all-reduces
        the compute gradients first, so every rank sees the same inf/NaN and skips the same steps.
        Returns (grad_norm of the unscaled gradients before clipping, whether the step was taken), both
        tensors on the device."""
        for p in self.params:
            if p.grad is None:  # a parameter that got no gradient still takes part in the reduction
                p.grad = torch.zeros_like(p)
        if reduce_grads is not None:
            reduce_grads(self.params)
        if self.masters is not self.params:
            for m, p in zip(self.masters, self.params):
                m.grad = p.grad.float()
        grads = [m.grad for m in self.masters]
        if self.scaling:
            torch._foreach_mul_(grads, self.scale.reciprocal())  # exact for a power-of-two S (the default); else within 1 ulp
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        # The one check of all gradients: an inf or NaN anywhere makes the global norm non-finite.
        found_inf = (~torch.isfinite(norm)).float()
        if clip > 0:
            torch._foreach_mul_(grads, torch.clamp(clip / (norm + 1e-6), max=1.0))
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # torch.amp's protocol: a fused optimizer reads found_inf on the device and leaves every
            # weight, moment and step count as it was when it is 1. No host sync.
            optimizer.found_inf = found_inf
            optimizer.step()
            del optimizer.found_inf
        elif not found_inf.item():  # any other optimizer: the host decides, which waits for the GPU
            optimizer.step()
        if self.masters is not self.params:
            torch._foreach_copy_([p.data for p in self.params], [m.data for m in self.masters])
        self.zero_grad()
        self.update_scale(found_inf.bool())
        return norm, found_inf == 0

    def update_scale(self, overflow):
        """Count the step; on overflow halve S (floor 1), after growth_interval good steps in a row double it."""
        self.skipped += overflow
        self.good_steps.copy_(torch.where(overflow, 0, self.good_steps + 1))
        if self.scaling and self.dynamic:
            grow = self.good_steps == self.growth_interval
            self.scale.copy_(torch.where(overflow, (self.scale / 2).clamp(min=1.0),
                                         torch.where(grow, self.scale * 2, self.scale)))
            self.good_steps.masked_fill_(grow, 0)

    def stuck(self, sd, skipped_before, steps):
        """Whether the overflow skips mean the run is lost, from state_dict() `sd`, the skipped count `steps`
        steps ago (at the last log line): bf16 and fp32 skip only on an inf or NaN gradient, with no scale to
        lower, so any skip is divergence; fp16 with S at its floor of 1 and no good step since (dynamic), or a
        static S with every one of the `steps` skipped, has nothing left to rescue."""
        if not sd["skipped"]:
            return False
        if not self.scaling:
            return True
        return sd["scale"] <= 1.0 and sd["good_steps"] == 0 if self.dynamic else sd["skipped"] - skipped_before == steps

    def zero_grad(self):
        for p in self.params + (self.masters if self.masters is not self.params else []):
            p.grad = None

    def master_state_dict(self):
        """The float32 weights under the model's parameter names: what a checkpoint stores."""
        return {n: m.detach().float() for n, m in zip(self.names, self.masters)}

    def state_dict(self):
        return {"scale": self.scale.item(), "good_steps": self.good_steps.item(), "skipped": self.skipped.item()}

    def load_state_dict(self, sd):
        self.scale.fill_(float(sd["scale"]))
        self.good_steps.fill_(int(sd["good_steps"]))
        self.skipped.fill_(int(sd["skipped"]))
