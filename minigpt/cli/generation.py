"""`minigpt generate` (generate.py): text from a run, streamed as it is sampled; with --costs, the
prefill's and the decode steps' FLOPs, bytes and energy. Also the --int8 options eval shares."""

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from minigpt import backend, kernels, units
from minigpt.cli.common import Parser
from minigpt.cli.training import energy_arguments, hardware_for
from minigpt.errors import ConfigError
from minigpt.nn import quant


def _generate_parser(prog="minigpt generate") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Write text with a trained model, streaming it as it is sampled (KV-cached).",
        epilog='example: python generate.py out/tiny --prompt "def " --max-new-tokens 300 '
        "--temperature 0.8 --top-k 50 --top-p 0.95 --seed 1",
    )
    p.add_argument("run", help="a run folder (out/tiny) or a checkpoint file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", default=None,
                     help="the text to continue (default: a newline); repeat it to decode several "
                     "prompts together, one KV cache each")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    src.add_argument("--prompt-ids", default=None, metavar="ID,ID,...",
                     help="the prompt as token ids (for a run with no tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=300, help="tokens to generate (default 300)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="continuations of each prompt, decoded together in one batch (default 1); "
                   "sample i of a batch uses seed + i")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample within this probability mass")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable samples")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default cpu)")
    p.add_argument("--costs", action="store_true",
                   help="after the text, print the prefill's and each decode step's FLOPs and bytes, "
                   "and the energy, split into prefill and decode (J/token each)")
    p.add_argument("--energy-json", default=None, metavar="PATH",
                   help="with --costs: also write the generation's energy (energy.json's schema plus "
                   "phases) to PATH")
    int8_arguments(p)
    energy_arguments(p)
    return p


def int8_arguments(p, mode_flag="--int8") -> None:
    """The quantization options generate and eval share: --bits, --int8 MODE and their details."""
    p.add_argument("--bits", type=int, choices=(32, 16, 8, 4), default=32,
                   help="weight width on load: 32 = float32 (default); 16, 8 or 4 = packed weight-only "
                   "weights (every linear layer and the LM head), read by the compiled kernels")
    p.add_argument("--group-size", type=int, default=32, help="--bits 4: inputs sharing one scale (default 32)")
    p.add_argument("--storage16", choices=("fp16", "bf16"), default="fp16",
                   help="--bits 16: fp16 (default) or bf16")
    p.add_argument("--kernels", choices=kernels.CHOICES, default=None,
                   help=f"the packed products' path: numba (compiled) or numpy (the reference); "
                   f"default {kernels.active()} (MINIGPT_KERNELS)")
    p.add_argument(mode_flag, dest="int8", choices=quant.MODES, default=None,
                   help="quantize on load: w8a32 = int8 weights, w8a8 = int8 weights and activations")
    p.add_argument("--int8-embedding", action="store_true", help="also read the token embedding from int8")
    p.add_argument("--kv-int8", action="store_true", help="keep the KV cache in int8")
    p.add_argument("--outlier-threshold", type=float, default=None,
                   help="w8a8: multiply feature dimensions with any |x| above this in float (LLM.int8()-like)")


def apply_int8(model, args) -> None:
    """Quantize as the options say: --bits 16/8/4, or --int8 MODE (and --kernels)."""
    quant.check_outlier_threshold(args.outlier_threshold, "--outlier-threshold")
    if args.kernels is not None:
        kernels.use(args.kernels)
    if args.bits != 32:
        if args.int8 is not None:
            raise ConfigError("--bits and --int8 are two ways to quantize: give one")
        if args.int8_embedding or args.outlier_threshold is not None:
            raise ConfigError("--int8-embedding and --outlier-threshold belong to --int8 MODE, not --bits")
        if model.gpt.quant is not None:
            raise ConfigError(f"{args.run}: already a quantized checkpoint; load it without --bits")
        model.quantize(bits=args.bits, group_size=args.group_size, storage16=args.storage16,
                       kv_int8=args.kv_int8)
        return
    if args.int8 is None:
        if args.int8_embedding or args.kv_int8 or args.outlier_threshold is not None:
            raise ConfigError("--int8-embedding, --kv-int8 and --outlier-threshold need --int8 MODE "
                              "(--kv-int8: or --bits)")
        return
    model.quantize(args.int8, args.int8_embedding, args.kv_int8, args.outlier_threshold)


def cmd_generate(argv) -> int:
    import minigpt

    args = _generate_parser().parse_args(argv)
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not 0 <= args.temperature < math.inf:  # nan fails too
        raise ConfigError(f"--temperature must be >= 0 and finite, got {args.temperature}")
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.energy_json is not None:
        if not args.costs:
            raise ConfigError("--energy-json needs --costs")
        if not Path(args.energy_json).parent.is_dir():
            raise ConfigError(f"--energy-json {args.energy_json}: no folder "
                              f"{Path(args.energy_json).parent}")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                prompts = [f.read()]
        except OSError as e:
            raise ConfigError(f"--prompt-file {args.prompt_file}: cannot read: {e.strerror or e}") from None
    else:
        prompts = args.prompt if args.prompt is not None else ["\n"]
    if args.costs and (len(prompts) > 1 or args.num_samples > 1):
        raise ConfigError("--costs reports one sequence's generation: give one --prompt and no "
                          "--num-samples (bench/decode.py --batch measures batched decode)")
    model = minigpt.load(args.run, device=args.device)
    apply_int8(model, args)
    model.gpt.prepare_decode()  # float32 weights laid out for the decode kernels (nn/tiled.py)
    if args.prompt_ids is not None:  # "" too: an empty list of ids is not a request for "\n"
        ids = _prompt_ids(args.prompt_ids, model)
        if not ids:
            raise ConfigError(f"--prompt-ids {args.prompt_ids!r}: no token ids given")
        batch = [ids]
    else:
        batch = [model.tokenizer.encode(prompt) for prompt in prompts]
    if any(len(ids) == 0 for ids in batch):
        raise ConfigError("the prompt is empty: give --prompt TEXT or a non-empty --prompt-file")
    block = model.config.model.block_size
    for i, ids in enumerate(batch):
        if len(ids) > block:
            print(f"note: the prompt has {len(ids)} tokens; keeping its last {block} (the context length)",
                  file=sys.stderr)
            batch[i] = ids[-block:]
    if len(batch) > 1 or args.num_samples > 1:
        return _generate_batch(model, batch, args)
    ids = batch[0]
    out = sys.stdout
    out.write(model.tokenizer.decode(ids))
    decode = model.tokenizer.stream_decoder()

    def emit(token):
        out.write(decode([token]))
        out.flush()

    from minigpt.counting.meter import METER
    from minigpt.hardware import counters

    if args.costs:  # the compiled kernels load on their first call (0.2 s): not the prefill's cost
        from minigpt.nn.model import KVCache

        with METER.paused():  # the prefill's own path, and a decode step's, once
            kv = KVCache(model.gpt.cfg, 1, model.gpt.params.data.dtype)
            model.gpt.logits(backend.asarray(np.array([ids])), kv, last_only=True)
            if kv.length < model.gpt.cfg.block_size:
                model.gpt.decode_step(ids[-1:], [kv])
    METER.reset()
    with counters.measure() as measured:
        gen = model.generation(ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                               args.seed, emit)
    out.write(decode([], final=True) + "\n")
    if args.costs:
        _print_generation_costs(len(ids), gen, measured, args, model)
    return 0


def _generate_batch(model, prompts: list, args) -> int:
    """Every prompt's --num-samples continuations, decoded together (sampling.generate_batch),
    printed one after another once all are done, each under a header line."""
    seqs = [ids for ids in prompts for _ in range(args.num_samples)]
    gens = model.generate_batch(seqs, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                args.seed)
    out = sys.stdout
    for i, (ids, gen) in enumerate(zip(seqs, gens)):
        p, k = divmod(i, args.num_samples)
        out.write(f"--- prompt {p + 1}, sample {k + 1} ---\n")
        out.write(model.tokenizer.decode(list(ids) + gen.tokens.tolist()) + "\n")
    out.flush()
    return 0


def _prompt_ids(text: str, model) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    V = model.config.model.vocab_size
    bad = [i for i in ids if not 0 <= i < V]
    if bad:
        raise ConfigError(f"--prompt-ids: {bad[0]} is not a token id of this model (0..{V - 1})")
    return ids


def _print_generation_costs(prompt_tokens: int, gen, measured, args, model=None) -> None:
    """The prefill's and the decode steps' FLOPs and bytes, then the energy report and the energy
    by phase, both from one energy document (--energy-json writes it). gen: the
    sampling.Generation, whose counts say how many forward passes and tokens each phase had."""
    from minigpt.counting import tables
    from minigpt.counting.meter import METER
    from minigpt.energy import run_energy

    rows = tables.rows_from_records(METER.records)
    t = tables.totals(rows)
    new_tokens = len(gen.tokens)
    print(f"\ncosts: prompt of {prompt_tokens} tokens, {new_tokens} new tokens (batch 1, KV cache)")
    calls = {"prefill": gen.prefills, "decode": gen.decode_steps}  # forward passes
    decode_steps = max(1, gen.decode_steps)
    cells = []
    for phase in (phase for phase in ("prefill", "decode") if phase in t):
        p = t[phase]
        nbytes = p["bytes_read"] + p["bytes_written"]
        per = (f"{tables.si(p['flops'] / decode_steps)}FLOP, {tables.si(nbytes / decode_steps, 'B')}"
               if phase == "decode" else "")
        cells.append((phase, str(calls[phase]), tables.si(p["flops"]), tables.si(nbytes, "B"),
                      f"{p['seconds']:.3f}", per))
    print("\n".join(units.rows_text(("phase", "calls", "FLOPs", "bytes", "seconds", "per token"),
                                    cells, align="<>>>><", rule=False)))
    if "decode" in t:
        d = t["decode"]
        print(f"bytes per generated token: {tables.si((d['bytes_read'] + d['bytes_written']) / decode_steps, 'B')}"
              f"; decode speed here: {decode_steps / d['seconds']:,.0f} tokens/s (metered seconds)"
              if d["seconds"] > 0 else "")
    if model is not None and args.device == "cpu":
        print(_predicted_line(model, prompt_tokens, gen, t))
    print(tables.CONVENTIONS)
    print()
    hw, on_cpu = hardware_for(args, args.device), args.device == "cpu"
    doc = run_energy.build(rows, measured.seconds, hw, measured, args.watts, new_tokens,
                           estimate=on_cpu)
    print("\n".join(run_energy.report_lines(doc)))
    _print_generation_energy(doc, rows, gen, args)


def _predicted_line(model, prompt_tokens: int, gen, t: dict) -> str:
    """The time model's prefill and decode against the meter's (int8 and KV-int8 included)."""
    from minigpt.energy import forecast
    from minigpt.train import timing_runs

    qcfg = model.gpt.quant.qcfg if model.gpt.quant is not None else None
    g = forecast.generation(model.gpt.cfg, timing_runs.time_model(), prompt_tokens,
                            gen.decode_steps, quant=qcfg)
    return forecast.generation_line(g, t.get("prefill", {}).get("seconds"),
                                    t.get("decode", {}).get("seconds"))


def _print_generation_energy(doc: dict, rows, gen, args) -> None:
    """Prefill and decode joules (metered seconds x power x PUE) and J/token; --energy-json."""
    from minigpt.energy import run_energy

    run_energy.add_phases(doc, rows, {"prefill": gen.prefill_tokens, "decode": gen.decode_steps})
    print(f"energy by phase ({run_energy.summary_line(doc)})")
    cells = []
    for phase in ("prefill", "decode"):
        p = doc["phases"].get(phase)
        if p is None or p["joules"] is None:
            continue
        per = f"{p['j_per_token']:.3g} J/token" if p["j_per_token"] is not None else "-"
        cells.append((phase, f"{p['tokens'] or 0} tokens", f"{p['joules']:.4g} J", per,
                      f"(roofline {p['joules_roofline']:.3g} J)"))
    if cells:
        print("\n".join(units.rows_text(("phase", "tokens", "joules", "per token", "roofline"),
                                        cells, align="<>>><", rule=False)[1:]))
    if args.energy_json:
        import json

        from minigpt.counting import tables

        tables._atomic_write(Path(args.energy_json), json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.energy_json}")
