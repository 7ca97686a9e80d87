"""AdamW on the flat buffers, global-norm gradient clipping, and the learning-rate schedule."""

import math

from minigpt import backend, kernels
from minigpt.counting import scopes
from minigpt.counting.meter import METER
from minigpt.nn import cuda_kernels


def lr_at(step: int, t) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_lr at max_steps (0-based step)."""
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    if step >= t.max_steps:
        return t.min_lr
    ratio = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.learning_rate - t.min_lr)


def zero_grad(g) -> None:
    """Set the flat gradient g to zero before a step's backward passes add into it: a write of
    every element (half a gigabyte at GPT-2 124M's size), counted in phase "optimizer" with the
    rest of the optimizer's work, wherever it is called."""
    with METER.in_phase("optimizer"), METER.scope(scopes.ZERO_GRAD), METER.op(kind="zero_grad", op="fill") as c:
        g.fill(0)
        c.count(elements=g.size, bytes_read=0, bytes_written=g.nbytes, dtype=g.dtype)


def clip_grad_norm(g, max_norm: float) -> float:
    """Scale the flat gradient g so its global L2 norm is at most max_norm (as torch's
    clip_grad_norm_: coefficient max_norm / (norm + 1e-6), capped at 1). Returns the norm before."""
    xp = backend.xp
    with METER.scope(scopes.CLIP), METER.op(kind="clip", op="norm") as c:
        norm = float(xp.linalg.norm(g))  # sqrt of the sum of squares, without a temporary
        c.count(elements=g.size, bytes_read=g.nbytes, bytes_written=0, dtype=g.dtype)
    coef = min(1.0, max_norm / (norm + 1e-6))
    # Scaled always, by 1 too: counts never depend on data.
    with METER.scope(scopes.CLIP), METER.op(kind="clip", op="scale") as c:
        g *= coef
        c.count(elements=g.size, bytes_read=g.nbytes, bytes_written=g.nbytes, dtype=g.dtype)
    return norm


class AdamW:
    """Adam with bias correction and decoupled weight decay on the first n_decay elements
    (the matrices: FlatBuffer puts them first). State: the two moments and the step count."""

    def __init__(self, params, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1):
        xp = backend.xp
        self.params = params
        self.m = xp.zeros_like(params.data)
        self.v = xp.zeros_like(params.data)
        self.t = 0
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay

    def step(self, g, lr: float) -> None:
        """One update of params.data from the flat gradient g."""
        xp = backend.xp
        p, m, v = self.params.data, self.m, self.v
        b1, b2 = self.beta1, self.beta2
        self.t += 1
        if cuda_kernels.active():
            return cuda_kernels.adamw_update(p, g, m, v, self.params.n_decay, lr, b1, b2, self.eps,
                                             self.weight_decay, self.t)
        step_size = lr / (1.0 - b1**self.t)
        root_bc2 = math.sqrt(1.0 - b2**self.t)
        if kernels.numba_on() and backend.device == "cpu":  # every pass below in one pass
            from minigpt.kernels import fused

            with METER.scope(scopes.ADAMW), METER.op(kind="adamw", op="update") as c:
                fused.adamw_update(p, g, m, v, self.params.n_decay, 1.0 - lr * self.weight_decay,
                                   b1, b2, self.eps, step_size, root_bc2)
                c.count(elements=p.size, bytes_read=p.nbytes + g.nbytes + m.nbytes + v.nbytes,
                        bytes_written=p.nbytes + m.nbytes + v.nbytes, dtype=p.dtype)
            return None

        def block(r):  # one cache-sized block of the flat buffers through every pass
            gr, mr, vr = g[r], m[r], v[r]
            mr *= b1
            tmp = gr * (1.0 - b1)
            mr += tmp
            vr *= b2
            xp.multiply(gr, gr, out=tmp)
            tmp *= 1.0 - b2
            vr += tmp
            xp.sqrt(vr, out=tmp)  # the denominator: sqrt(v) / sqrt(1 - b2^t) + eps
            tmp /= root_bc2
            tmp += self.eps
            xp.divide(mr, tmp, out=tmp)
            tmp *= step_size
            p[r] -= tmp

        with METER.scope(scopes.ADAMW), METER.op(kind="adamw", op="update") as c:
            p[: self.params.n_decay] *= 1.0 - lr * self.weight_decay  # decoupled decay, matrices only
            backend.map_rows(block, p.size, p.itemsize)
            c.count(elements=p.size, bytes_read=p.nbytes + g.nbytes + m.nbytes + v.nbytes,
                    bytes_written=p.nbytes + m.nbytes + v.nbytes, dtype=p.dtype)
