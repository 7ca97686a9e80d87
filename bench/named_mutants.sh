#!/bin/bash
# The six mutants the tests issue named (docs/testing.md): each is planted in a fresh clone of this
# repository's committed HEAD (in /tmp/mc), the whole suite runs with -x, and the first failing
# test is printed. "SURVIVED" means the suite missed one: a defect in the tests.
#   bash bench/named_mutants.sh
set -u
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
rm -rf /tmp/mc && git clone -q "$repo" /tmp/mc && cd /tmp/mc || exit 1
check() {  # name, file, text, its replacement, pytest arguments
  name=$1; file=$2; old=$3; new=$4; shift 4
  git checkout -q -- minigpt
  python - "$file" "$old" "$new" <<'PY'
import sys, pathlib
p = pathlib.Path(sys.argv[1]); s = p.read_text(); assert sys.argv[2] in s, sys.argv[2]
p.write_text(s.replace(sys.argv[2], sys.argv[3], 1))
PY
  if PYTHONPATH=/tmp/mc timeout 900 python -m pytest -q -x -p no:cacheprovider "$@" > /tmp/mc-$name.txt 2>&1; then
    echo "SURVIVED $name"; else echo "killed $name: $(grep -m1 FAILED /tmp/mc-$name.txt)"; fi
}
check kv_scales minigpt/nn/layers.py "att = quant.rescale(att, (vs.swapaxes(-1, -2),), att.dtype)" "att = quant.rescale(att, (ks.swapaxes(-1, -2),), att.dtype)" tests
check temperature minigpt/sampling.py "    z = z / temperature" "    z = z / 1.0" tests
check top_k_1 minigpt/sampling.py "    if top_k is not None and 0 < top_k < z.size:" "    top_k = 1 if top_k is not None else None
    if top_k is not None and 0 < top_k < z.size:" tests
check cosine_half minigpt/train/optim.py "math.cos(math.pi * ratio)" "math.cos(2 * math.pi * ratio)" tests
check gelu_12 minigpt/counting/meter.py '("gelu", "tanh"): 8,' '("gelu", "tanh"): 12,' tests
check softmax_5 minigpt/counting/meter.py '("softmax", "causal"): 7,' '("softmax", "causal"): 5,' tests
git checkout -q -- minigpt
