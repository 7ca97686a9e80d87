"""Int8 against fp32 on a trained run: bytes, speed here, the roofline ceiling, and greedy text.

    python bench/int8.py out/tiny [--tokens 256] [--repeats 3] [--hardware h100-sxm]

For fp32, w8a32 and w8a8 (and w8a8 with an int8 KV cache) it generates --tokens tokens, batch 1,
KV-cached, from the same prompt, and prints a table: weight bytes, bytes moved per generated token
(the meter's count), measured tokens/s on this CPU (best of --repeats), and the batch-1 decode
ceiling a memory-bound chip would have (its bandwidth / bytes per token). Then the greedy
continuations of a few prompts under each mode, side by side.

NumPy has no int8 matrix kernel: the int8 products run on the float64 BLAS (exact, see
METER.matmul_int8) and the w8a32 ones widen the int8 weights to float32 on every call, so int8 is
slower here, not faster. What int8 buys is bytes: a kernel that reads int8 weights directly moves
a quarter of fp32's weight bytes, and decode at batch 1 is bound by exactly those bytes.
"""

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import minigpt
from minigpt.counting.meter import METER
from minigpt.evaluate import weight_bytes
from minigpt.hardware import profiles

MODES = [("fp32", None, False), ("w8a32", "w8a32", False), ("w8a8", "w8a8", False),
         ("w8a8 + int8 KV", "w8a8", True)]
PROMPTS = ["def ", "class Parser:\n    def __init__(self", "import os\n", "    return "]


def load(run, mode, kv_int8):
    m = minigpt.load(run)
    if mode is not None:
        m.quantize(mode, kv_int8=kv_int8)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hardware", default="h100-sxm", help="profile for the decode ceiling")
    args = ap.parse_args()
    bandwidth = profiles.require(profiles.load_profile(args.hardware), "memory_bandwidth")
    prompt = minigpt.load(args.run).tokenizer.encode("def ")

    print(f"{args.run}: {args.tokens} new tokens, batch 1, KV cache; ceiling on {args.hardware} "
          f"({bandwidth / 1e12:.2f} TB/s)")
    print(f"{'mode':<16} {'weight bytes':>12} {'bytes/token':>12} {'tokens/s here':>14} "
          f"{'ceiling tok/s':>14}")
    models = {}
    for name, mode, kv_int8 in MODES:
        m = models[name] = load(args.run, mode, kv_int8)
        best = float("inf")
        for _ in range(args.repeats):
            METER.reset()
            t0 = time.perf_counter()
            m.generate(prompt, args.tokens, temperature=0)
            best = min(best, time.perf_counter() - t0)
        decode = [r for k, r in METER.records.items() if k.phase == "decode"]
        steps = max(1, args.tokens - 1)
        per_token = sum(r.bytes_read + r.bytes_written for r in decode) / steps
        print(f"{name:<16} {weight_bytes(m.gpt):>12,} {per_token:>12,.0f} {args.tokens / best:>14,.0f} "
              f"{bandwidth / per_token:>14,.0f}")

    print("\ngreedy continuations (temperature 0, 60 tokens):")
    for text in PROMPTS:
        ids = models["fp32"].tokenizer.encode(text)
        print(f"\nprompt {text!r}")
        for name, m in models.items():
            out = m.tokenizer.decode(m.generate(ids, 60, temperature=0))
            print(f"  {name:<16} {out!r}")
    agree = {name: np.mean([np.array_equal(models["fp32"].generate(models["fp32"].tokenizer.encode(t), 60, temperature=0),
                                           m.generate(m.tokenizer.encode(t), 60, temperature=0)) for t in PROMPTS])
             for name, m in models.items() if name != "fp32"}
    print("\nprompts whose 60 greedy tokens equal fp32's: " +
          ", ".join(f"{k} {v:.0%}" for k, v in agree.items()))


if __name__ == "__main__":
    main()
