"""Naming what went wrong: the first non-finite gradient in backward order, and what differs
between the data a checkpoint was trained on and the data a resumed run would use.
"""

import hashlib

import numpy as np

from minigpt import backend

_BLOCK_ORDER = ("mlp.c_proj", "mlp.c_fc", "ln_2", "attn.c_proj", "attn.c_attn", "ln_1")


def backward_order(names) -> list[str]:
    """Parameter names in the order backward produces their gradients: the LM head (tied to
    transformer.wte.weight), ln_f, the blocks from last to first (inside each, the reverse of the
    forward), then the position table. Names it does not know keep their layout order within
    their block, after the known ones (a new layer kind needs no change here to be scanned)."""
    def key(item):
        i, name = item
        if name == "transformer.wte.weight":
            return (0, 0, 0, i)
        if name.startswith("transformer.ln_f."):
            return (1, 0, 0, i)
        if name.startswith("transformer.h."):
            block, _, rest = name[len("transformer.h."):].partition(".")
            rank = next((r for r, p in enumerate(_BLOCK_ORDER) if rest.startswith(p)), len(_BLOCK_ORDER))
            return (2, -int(block) if block.isdigit() else 0, rank, i)
        return (3, 0, 0, i)
    return [name for _, name in sorted(enumerate(names), key=key)]


def first_nonfinite(buffer) -> str | None:
    """The first view of a FlatBuffer (in backward order) holding a NaN or an infinity."""
    xp = backend.xp
    for name in backward_order(list(buffer.views)):
        if not bool(xp.isfinite(buffer[name]).all()):
            return name
    return None


def describe_nonfinite(model) -> str:
    """Which gradient (and parameter, if any) went non-finite, for the error line."""
    grad = first_nonfinite(model.grads)
    if grad is None:
        what = "the gradient norm overflowed (every gradient element is finite)"
    else:
        what = f"first non-finite gradient, in backward order: {grad}"
    param = first_nonfinite(model.params)
    if param is not None:
        what += f"; parameter {param} is already non-finite"
    return what


def fingerprint(corpus) -> dict:
    """What identifies a corpus: its source, sizes and a sha256 of the token arrays."""
    h = hashlib.sha256()
    for part in (corpus.train, corpus.val):
        a = np.ascontiguousarray(part)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return {"source": corpus.source, "train_tokens": len(corpus.train),
            "val_tokens": len(corpus.val), "sha256": h.hexdigest()}


def dict_differences(saved, now, prefix: str = "", limit: int = 3) -> list[str]:
    """Where two JSON-like values differ, as short 'key: checkpoint X, now Y' phrases (any
    tokenizer's to_dict compares the same way)."""
    def short(v):
        text = repr(v)
        if len(text) > 40 and isinstance(v, (list, dict)):
            return f"a {type(v).__name__} of {len(v)}"
        return text if len(text) <= 40 else text[:37] + "..."
    out = []
    if isinstance(saved, dict) and isinstance(now, dict):
        for k in sorted(set(saved) | set(now), key=str):
            if saved.get(k) != now.get(k):
                if k in saved and k in now:
                    out += dict_differences(saved[k], now[k], f"{prefix}{k}.", limit)
                else:
                    out.append(f"{prefix}{k}: checkpoint {short(saved.get(k)) if k in saved else 'absent'}, "
                               f"now {short(now.get(k)) if k in now else 'absent'}")
            if len(out) >= limit:
                break
    elif isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        first = next(i for i, (a, b) in enumerate(zip(saved, now)) if a != b)
        out.append(f"{prefix}[{first}]: checkpoint {short(saved[first])}, now {short(now[first])}")
    else:
        out.append(f"{prefix.rstrip('.') or 'value'}: checkpoint {short(saved)}, now {short(now)}")
    return out[:limit]

