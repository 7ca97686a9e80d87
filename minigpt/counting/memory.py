"""Memory a training run needs, from shapes alone, and the pre-flight check that uses it.

The estimate follows what the code keeps alive at the peak of a training step (the end of the
forward pass and the start of the backward pass, after the first optimizer step has touched the
AdamW moments):

  parameters, gradients         P values each (one flat buffer apiece, nn/params.py)
  optimizer state               2 P (AdamW's m and v)
  lm_head product buffer        V C: the tied table's gradient product, kept between steps
  activations kept for backward what every layer's forward returns in its cache (nn/layers.py),
                                per block 20 N C + B H T^2 + 2 N values, plus the final
                                LayerNorm and the loss's probabilities (N V): the outputs of
                                the forward ops whose results the backward reads, each as
                                large as the closed form says that op writes
  largest temporary             the biggest set of arrays alive only inside one layer
                                (logits beside the probabilities, an MLP's (N, 4C) gradient,
                                attention's (B, H, T, T) gradient, ...)

with N = B T tokens of a micro-batch. Each piece is a function of the config, so a new kind of
layer adds its own activation and temporary terms in one place, as the mixture of experts does
(moe_block_activations). The activations name which ops' outputs stay alive and take their
sizes from the closed form's predicted forward (forward_writes), so a layer that changes what it
writes changes the estimate with it; the temporaries are sized here. measured_peak runs a real
training step in a fresh interpreter and reports its peak resident set: tests/test_memory.py and
bench/memory.py compare.

preflight() compares the total with the memory this machine has available now (Linux
/proc/meminfo MemAvailable; os.sysconf's available pages elsewhere) and refuses, in one line with
the numbers, a run that cannot fit.
"""

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace

from minigpt import config, units
from minigpt.counting import closed_form as cost_model
from minigpt.counting.scopes import (
    ATTN,
    ATTN_DROPOUT,
    C_ATTN,
    C_FC,
    C_PROJ,
    DROPOUT,
    EMBEDDING,
    GELU,
    LN_1,
    LN_2,
    LN_F,
    LOSS,
    MIX,
    MLP,
    RESID_DROPOUT,
    ROUTER,
    SOFTMAX,
    block,
    expert,
    join,
)
from minigpt.errors import ResourceError

ID_BYTES = 8  # token ids are int64 once batched


@dataclass
class Item:
    name: str
    nbytes: int
    note: str


def forward_writes(m, B: int, T: int, moe: bool = False) -> dict[tuple[str, str], int]:
    """Elements each op writes in the training forward of a one-block copy of model m, by
    (scope, op), as the closed form predicts them (float32 records: 4 bytes an element; an int64
    id counts as two). moe: the block is a mixture of experts with all N k assignments on
    expert 0, the dropless worst case; else a dense block."""
    if moe:
        one = replace(m, n_layer=1, moe_every=1)
        routing = [{0: [B * T * m.experts_per_token] + [0] * (m.n_experts - 1)}]
    else:
        one, routing = replace(m, n_layer=1, n_experts=1, experts_per_token=1), None
    records = cost_model.predict_training_step(one, B, T, routing=routing)
    return {(k.scope, k.op): r.bytes_written // 4 for k, r in records.items() if k.phase == "forward"}


def block_activations(m, B: int, T: int) -> dict[str, int]:
    """Elements one transformer block keeps for its backward, by layer."""
    w, h = forward_writes(m, B, T), block(0)
    attn, mlp = join(h, ATTN), join(h, MLP)
    acts = {
        "ln_1 (normalized x, 1/std, output)": w[join(h, LN_1), "normalize"],
        "attn.c_attn output (q, k, v)": w[join(attn, C_ATTN), "x@w"],
        "attn probabilities": w[join(attn, SOFTMAX), "causal"],
        "attn heads joined (c_proj input)": w[join(attn, MIX), "att@v"],
        "ln_2 (normalized x, 1/std, output)": w[join(h, LN_2), "normalize"],
        "mlp (c_fc output, tanh, gelu output)": w[join(mlp, C_FC), "x@w"] + w[join(mlp, GELU), "tanh"],
    }
    if m.dropout > 0:  # the dropped copy of the probabilities and its mask; of each residual
        # branch's dropout only the mask, half of what it writes (its output joins the stream)
        acts["dropout masks and outputs"] = (w[join(attn, ATTN_DROPOUT), "mask"]
                                             + w[join(attn, RESID_DROPOUT), "mask"] // 2
                                             + w[join(mlp, RESID_DROPOUT), "mask"] // 2)
    return acts


def moe_block_activations(m, B: int, T: int) -> dict[str, int]:
    """A mixture-of-experts block's (nn/moe.py), in elements: its MLP is replaced by the router's
    probabilities and choices, and per routed assignment the expert's gathered input, its MLP
    cache and its output (dropless: every token's experts_per_token assignments; a capacity
    factor only lowers this, so the estimate stays on the safe side)."""
    acts = block_activations(m, B, T)
    del acts["mlp (c_fc output, tanh, gelu output)"]
    w, N, k = forward_writes(m, B, T, moe=True), B * T, m.experts_per_token
    router, x = join(block(0), MLP, ROUTER), join(block(0), MLP, expert(0))
    acts["router (probabilities, choices, gates)"] = (w[router, "softmax"] + w[router, "top_k"]
                                                       + w[router, "renormalize"])
    ids = 2  # an int64 id takes two float32 slots
    per_assignment = 2 * ids + 1  # its id, its token's id and its gate, which no op writes
    acts["experts (gathered inputs, MLP caches, outputs)"] = (
        w[x, "gather"] + w[join(x, C_FC), "x@w"] + w[join(x, GELU), "tanh"]
        + w[join(x, C_PROJ), "x@w"] + k * N * per_assignment)
    return acts


def model_activations(m, B: int, T: int) -> dict[str, int]:
    """Elements the whole model keeps for its backward (per micro-batch), by part."""
    moe = sum(config.is_moe_block(m, i) for i in range(m.n_layer))
    dense = m.n_layer - moe
    acts = {f"{dense} dense blocks" if moe else f"{m.n_layer} blocks":
            dense * sum(block_activations(m, B, T).values())}
    if moe:
        acts[f"{moe} MoE blocks"] = moe * sum(moe_block_activations(m, B, T).values())
    w = forward_writes(m, B, T)
    acts |= {
        "ln_f (normalized x, 1/std, output)": w[LN_F, "normalize"],
        "loss probabilities (N x V)": w[LOSS, "loss"]}
    if m.dropout > 0:  # the mask, half of what the dropout writes
        acts["embedding dropout mask"] = w[join(EMBEDDING, DROPOUT), "mask"] // 2
    return acts


def backward_temporaries(m, B: int, T: int) -> dict[str, int]:
    """Elements alive beside the kept activations, at the worst moment of each layer.

    In a block's backward the residual stream's gradient, the MLP branch's input gradient (still
    bound in block_backward) and, with dropout, the two unmasked residual gradients stay alive
    while attention's backward holds its output gradient, the (B, H, T, T) gradient of the
    probabilities and the q, k, v gradients, and c_attn writes the input gradient."""
    C, H, V, N = m.n_embd, m.n_head, m.vocab_size, B * T
    d = 1 if m.dropout > 0 else 0
    att = B * H * T * T
    temps = {
        "logits beside the loss probabilities": N * V + 2 * N,
        "lm_head input gradient (N x C)": N * C,
        "mlp backward (N x 4C gradient, weight product)": (1 + d) * N * C + 4 * N * C + 4 * C * C,
        "attention backward at c_attn": (7 + 2 * d) * N * C + att,
    }
    if d:
        temps["attention backward at its dropout"] = 8 * N * C + 2 * att
    return temps


def itemsize(dtype: str) -> int:
    return 8 if dtype == "float64" else 4


def training_estimate(cfg, batch: int | None = None, seq: int | None = None) -> list[Item]:
    """The memory of a training run, piece by piece (bytes)."""
    m, t = cfg.model, cfg.train
    B = batch or t.batch_size
    T = seq or m.block_size
    s = itemsize(t.dtype)
    P = cost_model.n_params(m)
    acts = model_activations(m, B, T)
    temps = backward_temporaries(m, B, T)
    worst = max(temps, key=temps.get)
    batches = (1 + cfg.eval.batches) * 2 * B * T * ID_BYTES  # a training batch + the fixed eval ones
    return [
        Item("parameters", P * s, f"{P:,} x {s} B"),
        Item("gradients", P * s, "one flat buffer like the parameters"),
        Item("optimizer state", 2 * P * s, "AdamW m and v"),
        Item("activations kept for backward", sum(acts.values()) * s,
             f"batch {B} x {T} tokens: " + ", ".join(f"{k} {v * s / 2**20:,.1f} MiB" for k, v in acts.items())),
        Item("largest temporary", temps[worst] * s, worst),
        Item("lm_head product buffer", m.vocab_size * m.n_embd * s,
             "the (V, C) gradient product, kept between steps (GPT._scratch_like)"),
        Item("token batches", batches, f"int64 inputs and targets, 1 + {cfg.eval.batches} eval batches"),
    ]


def total(items: list[Item]) -> int:
    return sum(i.nbytes for i in items)


def available_bytes() -> tuple[int | None, str]:
    """(bytes available now, where the figure came from), or (None, why not) where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        if pages > 0:
            return pages * os.sysconf("SC_PAGE_SIZE"), "os.sysconf available pages"
    except (AttributeError, ValueError, OSError):
        pass
    return None, "unknown on this system"


def gib(n: float) -> str:
    """Bytes in GiB, MiB or KiB, whichever reads best."""
    if n >= 2**30:
        return f"{n / 2**30:,.2f} GiB"
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def format_table(items: list[Item], title: str) -> str:
    rows = [(i.name, gib(i.nbytes), i.note) for i in items] + [("total", gib(total(items)), "")]
    avail, where = available_bytes()
    if avail is not None:
        rows.append(("available on this machine", gib(avail), where))
    # The heads' padding is the columns' least width, so the estimates of different runs line up.
    head = (f"{'what':<30}", f"{'bytes':>12}", "note")
    return "\n".join([title, *units.rows_text(head, rows, align="<><", rule=False)])


def preflight(cfg, available: int | None = None, batch: int | None = None, processes: int = 1) -> int:
    """Refuse (ResourceError, one line) a run whose estimate exceeds the available memory.
    Returns the estimate in bytes. available: override the machine's figure (tests); batch: the
    sequences one process holds (a data-parallel rank's share); processes: how many such
    processes share this machine (the MPI ranks)."""
    items = training_estimate(cfg, batch)
    need = total(items) * processes
    source = "given"
    if available is None:
        available, source = available_bytes()
    if available is not None and need > available:
        parts = ", ".join(f"{i.name} {gib(i.nbytes)}" for i in items[:5])
        each = f", {processes} processes of {gib(total(items))} each" if processes > 1 else ""
        raise ResourceError(
            f"{cfg.name}: this run needs about {gib(need)} of memory ({parts}{each}) but "
            f"{gib(available)} is available ({source}); lower [train] batch_size or the model size "
            f"(minigpt costs --config CONFIG --memory shows the estimate; train --skip-memory-check "
            f"overrides)")
    return need


# ----------------------------------------------------------------------------- measuring it

_PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from minigpt import backend, config
    from minigpt.nn.model import GPT
    from minigpt.nn.params import FlatBuffer, init
    from minigpt.train.optim import AdamW
    from minigpt.train.trainer import training_step
    L, C, H, T, B, V = map(int, sys.argv[1:7])
    drop = float(sys.argv[7])
    E, K = map(int, sys.argv[8:10])
    m = config.Config().model
    m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size, m.dropout = L, C, H, T, V, drop
    m.n_experts, m.experts_per_token = E, K
    backend.keep_freed_memory()  # as the trainer does
    rng = np.random.default_rng(0)
    model = GPT(m, init(m, rng))
    model.grads = FlatBuffer(m)
    opt = AdamW(model.params)
    drop_rng = np.random.default_rng(1) if drop > 0 else None
    opt.m.fill(1e-3)  # resident, as after a first step (zeros_like leaves pages untouched)
    opt.v.fill(1e-6)
    x, y = rng.integers(0, V, size=(2, B, T))
    training_step(model, opt, [(x, y)], 1e-3, 1.0, drop_rng)
    try:  # Linux: this process's own peak (see measured_peak)
        with open("/proc/self/status") as f:
            print(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(kib * 1024 if sys.platform.startswith("linux") else kib)  # macOS reports bytes
""")
BASELINE_SHAPE = (1, 8, 2, 8, 1, 256, 0.0)  # what the interpreter, numpy and BLAS take alone


def step_estimate(n_layer: int, n_embd: int, n_head: int, block_size: int, batch: int,
                  vocab_size: int, dropout: float = 0.0, n_experts: int = 1,
                  experts_per_token: int = 1) -> int:
    """The estimate for what measured_peak runs (the same arguments): a float32 training step,
    without the trainer's token batches (the probe holds no evaluation batches)."""
    cfg = config.Config()
    m = cfg.model
    m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size, m.dropout = (
        n_layer, n_embd, n_head, block_size, vocab_size, dropout)
    m.n_experts, m.experts_per_token = n_experts, experts_per_token
    cfg.train.batch_size = batch
    return sum(i.nbytes for i in training_estimate(cfg) if i.name != "token batches")


def measured_peak(n_layer: int, n_embd: int, n_head: int, block_size: int, batch: int,
                  vocab_size: int, dropout: float = 0.0, n_experts: int = 1,
                  experts_per_token: int = 1) -> int:
    """Peak resident set (bytes) of a fresh interpreter that runs one float32 training step at
    this shape, after AdamW's moments are resident (as after a first step). Subtract
    measured_peak(*BASELINE_SHAPE) to leave the training step's own memory. POSIX only.

    On Linux the figure is /proc/self/status VmHWM, not getrusage's ru_maxrss: the kernel carries
    ru_maxrss across fork and exec, so a child started by a big process (a test runner holding a
    few hundred MB) reports at least its parent's peak. VmHWM belongs to the child's own memory.
    Elsewhere (macOS) ru_maxrss is what there is."""
    shape = (n_layer, n_embd, n_head, block_size, batch, vocab_size, dropout, n_experts,
             experts_per_token)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", _PROBE, *map(str, shape)], capture_output=True,
                       text=True, timeout=600, check=True, env=env)
    return int(r.stdout.split()[-1])
