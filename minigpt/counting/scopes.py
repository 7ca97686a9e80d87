"""Scope names: where in the model a record's work happened, named once.

The model enters these scopes (`with METER.scope(LN_1):` inside `with METER.scope(block(3)):`
makes "h3.ln_1") and the closed form predicts its records under the same paths
(`join(block(3), ATTN, C_ATTN)` is "h3.attn.c_attn"), so renaming a layer is one edit here.
Names only: what each scope costs is derived twice, independently, by the meter from the arrays
and by the closed form from the shapes.
"""

# The model's top level, in the order a training step runs them.
EMBEDDING = "embedding"  # token + position lookup
LN_F = "ln_f"  # the final LayerNorm
LM_HEAD = "lm_head"  # logits, the product with the tied token table
LOSS = "loss"  # cross-entropy
ZERO_GRAD = "zero_grad"  # the gradients set to zero before a step's backward passes
CLIP = "clip"  # gradient clipping
ADAMW = "adamw"  # the optimizer's update
DIST = "dist"  # data-parallel allreduces (phase "communication")


def block(i: int) -> str:
    """Transformer block i: "h3" (GPT-2 names its blocks transformer.h.<i>)."""
    return f"h{i}"


# Inside a block.
LN_1 = "ln_1"
ATTN = "attn"
RESIDUAL_1 = "residual_1"
LN_2 = "ln_2"
MLP = "mlp"
RESIDUAL_2 = "residual_2"

# Inside attention: q, k, v; q @ k^T; the causal softmax; att @ v; the output projection.
C_ATTN = "c_attn"
SCORES = "scores"
SOFTMAX = "softmax"
MIX = "mix"
C_PROJ = "c_proj"  # the MLP's output projection too

# Inside an MLP (and each expert of a mixture-of-experts MLP, which has a router beside them).
C_FC = "c_fc"
GELU = "gelu"
ROUTER = "router"


def expert(e: int) -> str:
    """Expert e of a mixture-of-experts MLP: "expert3"."""
    return f"expert{e}"


# Dropout, under the scope of what it drops: embedding.dropout, attn.attn_dropout (the
# probabilities), attn.resid_dropout and mlp.resid_dropout (the branches).
DROPOUT = "dropout"
ATTN_DROPOUT = "attn_dropout"
RESID_DROPOUT = "resid_dropout"

OUTLIERS = "outliers"  # int8: the float product of outlier dimensions, under its layer's scope


def join(*names: str) -> str:
    """A scope path, as nested METER.scope blocks build it: join("h3", "attn") -> "h3.attn"."""
    return ".".join(names)
