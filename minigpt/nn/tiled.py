"""Float32 weights laid out for a batched decode step's few-row products (minigpt/kernels/tiles.py).

GPT.prepare_decode (generation, serving, bench/decode.py) wraps every block's linear weights and
the LM head in a TiledWeight: the float weight itself, and a copy in the kernel's column tiles
(as many bytes again: 497 MB at GPT-2 124M's size, so only for decoding; the copy goes when a
backward pass runs). The decode steps' products (a batch of sequences, one new token each, or of
prompts in an extend step) then take the kernel, where Numba runs and the activations are
float32, and NumPy's product otherwise; the kernel ran faster than OpenBLAS at every row count
measured, 1 to 512 (kernels/tiles.py).

Either way the record is the one np.matmul's product carries (dtype float32, 2 N K M FLOPs, x and
the K x M weight read, the output written): the tiles pad nothing, so the meter and the closed
form do not depend on which ran.
"""

from dataclasses import dataclass

import numpy as np

from minigpt import backend, kernels
from minigpt.counting.meter import METER, matmul
from minigpt.kernels import tiles

WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class TiledWeight:
    """w (K, M) as x @ w sees it (a float32 array, any strides), and its tiles for the kernel."""

    w: object
    tiles: np.ndarray
    rest: np.ndarray

    @property
    def shape(self):
        return self.w.shape


def usable(dtype) -> bool:
    """Whether weights of this dtype can be tiled here: float32 in host memory, Numba installed."""
    return kernels.AVAILABLE and backend.device == "cpu" and np.dtype(dtype) == np.float32


def tile(w) -> TiledWeight:
    return TiledWeight(w, *tiles.pack(w))


def tile_block(p: dict) -> dict:
    """A block's parameter views -> {name: TiledWeight} for those of its linear weights it has (a
    mixture-of-experts block has no dense MLP)."""
    return {name: tile(p[name]) for name in WEIGHTS if name in p}


def product(x2, w: TiledWeight, op: str = "x@w"):
    """x2 (N, K) @ w -> (N, M), recorded as np.matmul's product is (module docstring)."""
    if not (kernels.numba_on() and x2.dtype == np.float32):
        return matmul(x2, w.w, op=op)
    if not METER.enabled:
        return tiles.product(x2, w.tiles, w.rest)
    t0 = METER.clock()
    out = tiles.product(x2, w.tiles, w.rest)
    seconds = METER.clock() - t0
    flops, read, written = product_counts(x2, out)
    METER.add(kind="matmul", op=op, dtype=out.dtype, flops=flops, bytes_read=read, bytes_written=written,
              seconds=seconds)
    return out


def product_counts(x2, out) -> tuple:
    """(FLOPs, bytes read, bytes written) of out = x2 @ w, the K x M weight read once: the record
    of product, for it and for the compiled decode step (nn/compiled.py)."""
    N, K = x2.shape
    M = out.shape[1]
    return 2 * N * K * M, x2.nbytes + K * M * out.itemsize, out.nbytes
