"""`minigpt eval`: a model's quality on its validation split, and an int8 model against fp32.

Windows of block_size tokens tile the validation split (non-overlapping, in order, at most
max_tokens of them). For each position we compare the next-token distributions of the fp32 model
(p) and the evaluated model (q):

    val_loss        mean -log q(target)                     perplexity = exp(val_loss)
    delta_loss      (val_loss - fp32 val_loss) / fp32 val_loss   (relative)
    kl_divergence   mean KL(p || q), in nats
    top1_agreement  fraction of positions where argmax p == argmax q

plus the weights' bytes as stored for inference and the bytes moved per generated token (the
meter's count for a decode step at the middle of the context, which the closed-form model gives
exactly).
"""

import numpy as np

from minigpt import backend
from minigpt.counting import closed_form as cost_model
from minigpt.train.data import load_corpus

EVAL_BATCH = 16


def validation_windows(model, max_tokens: int) -> np.ndarray:
    """(n, block_size + 1) windows tiling the model's validation split."""
    cfg = model.config
    corpus = load_corpus(cfg.data, model.tokenizer)
    T = cfg.model.block_size
    n = min((len(corpus.val) - 1) // T, max(1, max_tokens // T))
    return np.stack([corpus.val[i * T : i * T + T + 1] for i in range(n)]).astype(np.int64)


def _log_softmax(logits):
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def weight_bytes(gpt) -> int:
    """Bytes of the weights as inference reads them: int8 tables and scales where quantized."""
    p = gpt.params
    if gpt.quant is None:
        return p.data.nbytes
    quantized = set(gpt.quant.tables)
    rest = sum(v.nbytes for name, v in p.views.items() if name not in quantized)
    return gpt.quant.nbytes + rest


def bytes_per_token(gpt) -> int:
    """Bytes one decode step moves at position block_size // 2 (weights, KV cache, activations)."""
    qcfg = gpt.quant.qcfg if gpt.quant is not None else None
    recs = cost_model.predict_decode(gpt.cfg, 1, gpt.cfg.block_size // 2, quant=qcfg)
    return sum(r.bytes_read + r.bytes_written for r in recs.values())


def evaluate(model, reference=None, max_tokens: int = 1 << 17, progress=None) -> dict:
    """Metrics of `model` on its validation split; against `reference` (the fp32 model) if given."""
    windows = validation_windows(model, max_tokens)
    nll, kl, agree, ref_nll, count = 0.0, 0.0, 0, 0.0, 0
    for i in range(0, len(windows), EVAL_BATCH):
        chunk = windows[i : i + EVAL_BATCH]
        x, y = chunk[:, :-1], chunk[:, 1:]
        logq = _log_softmax(backend.to_host(model.gpt.logits(backend.asarray(x))))  # (b, T, V)
        picked = np.take_along_axis(logq, y[..., None], axis=-1)[..., 0]
        nll -= picked.sum()
        count += y.size
        if reference is not None:
            logp = _log_softmax(backend.to_host(reference.gpt.logits(backend.asarray(x))))
            ref_nll -= np.take_along_axis(logp, y[..., None], axis=-1).sum()
            kl += (np.exp(logp) * (logp - logq)).sum()
            agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        if progress is not None:
            progress(len(chunk))
    out = {"tokens": count, "val_loss": nll / count, "perplexity": float(np.exp(nll / count))}
    if reference is not None:
        ref = ref_nll / count
        out |= {"fp32_val_loss": ref, "delta_loss": (out["val_loss"] - ref) / ref,
                "kl_divergence": kl / count, "top1_agreement": agree / count}
    out |= {"weight_bytes": weight_bytes(model.gpt), "bytes_per_token": bytes_per_token(model.gpt)}
    return out
