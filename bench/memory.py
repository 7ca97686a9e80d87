"""The memory estimate (minigpt/counting/memory.py) against the measured peak resident set.

    python bench/memory.py

For each shape: the closed form's estimate (parameters, gradients, AdamW state, activations kept
for backward, the largest temporary), and the peak resident set of a fresh interpreter running
one training step at that shape minus the same at a tiny shape (interpreter, numpy, BLAS). The
tests demand agreement within 20% on the first four shapes (tests/test_memory.py).
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt.counting import memory

# (n_layer, n_embd, n_head, block_size, batch, vocab_size, dropout)
SHAPES = [(1, 64, 2, 64, 128, 256, 0.0), (3, 48, 2, 256, 16, 256, 0.0),
          (2, 32, 2, 128, 64, 256, 0.1), (1, 32, 2, 64, 256, 512, 0.0),
          (4, 128, 2, 64, 64, 256, 0.0),  # configs/tiny.toml
          (2, 64, 2, 128, 128, 256, 0.0), (4, 96, 4, 256, 16, 256, 0.0)]


def main() -> None:
    baseline = memory.measured_peak(*memory.BASELINE_SHAPE)
    print(f"baseline (interpreter, numpy, BLAS, a tiny step): {baseline / 2**20:.1f} MiB")
    print(f"{'L':>2} {'C':>4} {'H':>2} {'T':>4} {'B':>4} {'V':>4} {'drop':>4}  {'estimate':>10}  "
          f"{'measured':>10}  {'measured/estimate':>17}")
    for shape in SHAPES:
        est = memory.step_estimate(*shape)
        meas = memory.measured_peak(*shape) - baseline
        L, C, H, T, B, V, drop = shape
        print(f"{L:>2} {C:>4} {H:>2} {T:>4} {B:>4} {V:>4} {drop:>4}  {est / 2**20:8.1f} Mi  "
              f"{meas / 2**20:8.1f} Mi  {meas / est:17.3f}")


if __name__ == "__main__":
    main()
