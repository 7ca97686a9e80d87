"""`minigpt <command>`: train, generate (and the cost tools). train.py and generate.py at the top of
the repository are three-line wrappers around the first two.

Bad input of any kind ends in one line on stderr and exit code 2; see minigpt.errors.
"""

import argparse
import sys
from pathlib import Path

from minigpt.errors import ConfigError, MiniGPTError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a ConfigError like any other bad input."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message}")


def _train_parser(prog="minigpt train") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Train a GPT-2 from scratch on a corpus. Writes <out_dir>/log.jsonl (one line per "
        "evaluation) and <out_dir>/ckpt.npz (everything needed to resume or generate), then the "
        "costs (costs.json, costs.csv), the run's energy (energy.json) and report.html.",
        epilog="example: python train.py configs/tiny.toml --set train.max_steps=100",
    )
    p.add_argument("config", help="a TOML config, e.g. configs/tiny.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config field (repeatable), e.g. --set train.max_steps=100")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out_dir>/ckpt.npz; reproduces the uninterrupted run exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="start even if the memory estimate (minigpt costs --config CONFIG --memory) "
                   "exceeds the memory this machine has available")
    _energy_arguments(p)
    return p


def _energy_arguments(p) -> None:
    p.add_argument("--watts", type=float, default=None,
                   help="this machine's power draw in W, for the time x power and roofline energy "
                   "figures where no energy counter was read (default: the hardware profile's power "
                   "where it has one, else an estimate from the CPU's rated power and the run's "
                   "CPU time, marked 'estimated')")
    p.add_argument("--hardware", default=None,
                   help="hardware profile for the energy report (default local-cpu on the CPU; see "
                   "minigpt hardware)")


def cmd_train(argv) -> int:
    from minigpt.train import dist

    if dist.launched_size() > 1:  # under mpiexec -n N: see _train_on_ranks
        return _train_on_ranks(argv)
    return _train(argv)


def _train_setup(argv):
    """Parse the arguments, load the config, build the trainer: (args, trainer)."""
    from minigpt import config
    from minigpt.train.trainer import Trainer

    args = _train_parser().parse_args(argv)
    cfg = config.load(args.config, args.overrides)
    return args, Trainer(cfg, resume=args.resume, progress=not args.no_progress,
                         check_memory=not args.skip_memory_check)


def _train_on_ranks(argv) -> int:
    """`mpiexec -n N python train.py ...`: rank 0 trains and prints as one process would, the
    others train quietly. A failure while setting up (the same bad config on every rank, or a file
    one rank cannot read): the ranks compare notes, rank 0 prints the first one's line, and all
    exit 2. A failure while training: that rank prints its line and aborts every rank (MPI exits
    with the code), so none waits forever in an allreduce."""
    import traceback

    from minigpt.train import dist
    from minigpt.train.trainer import TrainingDiverged

    w = dist.world()  # without mpi4py: a ConfigError on each rank, and nothing yet to wait for
    failure = None
    try:
        args, trainer = _train_setup(argv)
    except SystemExit:  # --help
        raise
    except MiniGPTError as e:
        failure = f"error: {e}"
    except Exception as e:  # noqa: BLE001 - a bug: its traceback, then the same agreement
        traceback.print_exc()
        failure = f"error: {type(e).__name__}: {e}"
    first = dist.first_failure(w, failure)
    if first is not None:
        if w.rank == 0:
            print(first, file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return _train(argv, args, trainer)
    except SystemExit:
        raise
    except TrainingDiverged as e:  # the summed loss: every rank sees it, rank 0 says it
        dist.fail(w, f"error: {e}", 1, say=w.rank == 0)
    except MiniGPTError as e:
        dist.fail(w, f"error: {e}", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        dist.fail(w, "aborted", 130)
    except Exception as e:  # noqa: BLE001 - a bug on one rank must stop them all
        traceback.print_exc()
        dist.fail(w, f"error: {type(e).__name__}: {e}", 1)
    return 1  # (not reached: fail aborts)


def _train(argv, args=None, trainer=None) -> int:
    if trainer is None:
        args, trainer = _train_setup(argv)
    if trainer.world.rank != 0:  # the other ranks of mpiexec -n N: quiet
        trainer.run()
        return 0
    c = trainer.corpus
    print(f"corpus: {c.source}: {c.n_files} files, {len(c.train):,} training and {len(c.val):,} "
          f"validation tokens", file=sys.stderr)
    from minigpt.costs import power

    start_tokens = trainer.state.tokens  # > 0 when resumed
    with power.measure() as measured:
        result = trainer.run()
    if result.interrupted:
        print(f"stopped at step {result.steps}; checkpoint saved to {trainer.ckpt_path}. Continue "
              f"with: python train.py {args.config} --resume", file=sys.stderr)
        return 143 if trainer.stopped_by == "SIGTERM" else 130
    print(f"done: {result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.1f} s; "
          f"val loss {result.val_loss:.4f} nats/token ({result.val_bpb:.4f} bits/byte); checkpoint {trainer.ckpt_path}")
    _print_training_costs(trainer, result, measured, args, start_tokens)
    return 0


def _hardware_for(args, device: str):
    return args.hardware or ("local-cpu" if device == "cpu" else None)


def _print_training_costs(trainer, result, measured, args, start_tokens: int = 0) -> None:
    from minigpt import report_html
    from minigpt.costs import calibrate, energy, projection, report, run_energy
    from minigpt.meter import METER

    on_cpu = trainer.cfg.train.device == "cpu"
    peak, where = calibrate.local_peak() if on_cpu else (None, "")
    rows = report.rows_from_records(METER.records)
    ranks, everyone = trainer.world.size, result.tokens
    if ranks > 1:  # the counts are rank 0's: its share of the tokens goes with them
        result.tokens = trainer.state.counted_tokens
    print()
    print(report.summary(rows, result.steps, result.tokens, peak, where))
    if ranks > 1:
        print(f"data parallel over {ranks} MPI ranks: the counts above are rank 0's, on its "
              f"{result.tokens:,} of the {everyone:,} tokens (every rank did the same)")
    print(f"details: minigpt costs {trainer.out_dir} --by op  (also {trainer.out_dir}/costs.json, costs.csv)")
    print()
    # this session's energy: a resumed run's earlier sessions were reported when they ran
    session = _session_rows(rows, trainer.meter_rows)
    hw = _hardware_for(args, trainer.cfg.train.device)
    tokens = (everyone - start_tokens) // ranks  # this session's tokens (rank 0's share of them)
    print("\n".join(energy.report_lines(session, measured.seconds, hw, measured=measured,
                                       watts=args.watts, tokens=tokens, estimate=on_cpu)))
    doc = run_energy.build(session, measured.seconds, hw, measured, args.watts, tokens,
                           estimate=on_cpu)
    print(f"wrote {run_energy.save(trainer.out_dir, doc)}")
    print(projection.gpt3_projection_line(result.tokens, rows, joules=measured.total_joules))
    print(f"report: {report_html.write(trainer.out_dir)}  (open it in a browser)")
    _print_moe_summary(trainer, result)


def _print_moe_summary(trainer, result) -> None:
    """A MoE run's parameters, FLOPs per token and expert load (nothing for a dense model)."""
    from minigpt.meter import METER
    from minigpt.train import moe_stats

    lines = moe_stats.summary_lines(trainer.cfg, trainer.state, METER.records, result.tokens)
    if lines:
        print()
        print("\n".join(lines))


def _session_rows(rows, before) -> list[dict]:
    """rows minus a resumed run's rows at its start (the counts this session added)."""
    from minigpt.costs import report

    if not before:
        return rows
    old = report.records_from_rows(before)
    out = []
    for r in rows:
        key = (r["scope"], r["op"], r["kind"], r["phase"], r["dtype"])
        o = old.get(key)
        d = dict(r) if o is None else r | {k: r[k] - getattr(o, k) for k in report.NUMBERS}
        if d["calls"] > 0:
            out.append(d)
    return out


def _generate_parser(prog="minigpt generate") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Write text with a trained model, streaming it as it is sampled (KV-cached).",
        epilog='example: python generate.py out/tiny --prompt "def " --max-new-tokens 300 '
        "--temperature 0.8 --top-k 50 --top-p 0.95 --seed 1",
    )
    p.add_argument("run", help="a run folder (out/tiny) or a checkpoint file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="the text to continue (default: a newline)")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    src.add_argument("--prompt-ids", default=None, metavar="ID,ID,...",
                     help="the prompt as token ids (for a run with no tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=300, help="tokens to generate (default 300)")
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
    _int8_arguments(p)
    _energy_arguments(p)
    return p


def _int8_arguments(p, mode_flag="--int8") -> None:
    p.add_argument(mode_flag, dest="int8", choices=("w8a32", "w8a8"), default=None,
                   help="quantize on load: w8a32 = int8 weights, w8a8 = int8 weights and activations")
    p.add_argument("--int8-embedding", action="store_true", help="also read the token embedding from int8")
    p.add_argument("--kv-int8", action="store_true", help="keep the KV cache in int8")
    p.add_argument("--outlier-threshold", type=float, default=None,
                   help="w8a8: multiply feature dimensions with any |x| above this in float (LLM.int8()-like)")


def _apply_int8(model, args) -> None:
    if args.outlier_threshold is not None and args.outlier_threshold <= 0:
        raise ConfigError(f"--outlier-threshold must be > 0, got {args.outlier_threshold}")
    if args.int8 is None:
        if args.int8_embedding or args.kv_int8 or args.outlier_threshold is not None:
            raise ConfigError("--int8-embedding, --kv-int8 and --outlier-threshold need --int8 MODE")
        return
    model.quantize(args.int8, args.int8_embedding, args.kv_int8, args.outlier_threshold)


def cmd_generate(argv) -> int:
    import minigpt

    args = _generate_parser().parse_args(argv)
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
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
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                prompt = f.read()
        except OSError as e:
            raise ConfigError(f"--prompt-file {args.prompt_file}: cannot read: {e.strerror or e}") from None
    else:
        prompt = args.prompt if args.prompt is not None else "\n"
    model = minigpt.load(args.run, device=args.device)
    _apply_int8(model, args)
    ids = _prompt_ids(args.prompt_ids, model) if args.prompt_ids else model.tokenizer.encode(prompt)
    if len(ids) == 0:
        raise ConfigError("the prompt is empty: give --prompt TEXT or a non-empty --prompt-file")
    block = model.config.model.block_size
    if len(ids) > block:
        print(f"note: the prompt has {len(ids)} tokens; keeping its last {block} (the context length)",
              file=sys.stderr)
        ids = ids[-block:]
    out = sys.stdout
    out.write(model.tokenizer.decode(ids))
    decode = model.tokenizer.stream_decoder()

    def emit(token):
        out.write(decode([token]))
        out.flush()

    from minigpt.costs import power
    from minigpt.meter import METER

    METER.reset()
    with power.measure() as measured:
        model.generate(ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, emit)
    out.write(decode([], final=True) + "\n")
    if args.costs:
        _print_generation_costs(len(ids), args.max_new_tokens, measured, args)
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


def _print_generation_costs(prompt_tokens: int, new_tokens: int, measured, args) -> None:
    from minigpt.costs import energy, report
    from minigpt.meter import METER

    rows = report.rows_from_records(METER.records)
    t = report.totals(rows)
    print(f"\ncosts: prompt of {prompt_tokens} tokens, {new_tokens} new tokens (batch 1, KV cache)")
    print(f"{'phase':<8}  {'calls':>6}  {'FLOPs':>11}  {'bytes':>10}  {'seconds':>8}  per token")
    decode_steps = max(1, new_tokens - 1)  # the first new token comes from the prefill's logits
    for phase in ("prefill", "decode"):
        if phase not in t:
            continue
        p = t[phase]
        nbytes = p["bytes_read"] + p["bytes_written"]
        per = (f"{report.si(p['flops'] / decode_steps)}FLOP, {report.si(nbytes / decode_steps, 'B')}"
               if phase == "decode" else "")
        calls = sum(r["calls"] for r in rows if r["phase"] == phase and r["scope"] == "embedding")
        print(f"{phase:<8}  {calls:>6}  {report.si(p['flops']):>11}  {report.si(nbytes, 'B'):>10}  "
              f"{p['seconds']:8.3f}  {per}")
    if "decode" in t:
        d = t["decode"]
        print(f"bytes per generated token: {report.si((d['bytes_read'] + d['bytes_written']) / decode_steps, 'B')}"
              f"; decode speed here: {decode_steps / d['seconds']:,.0f} tokens/s (metered seconds)"
              if d["seconds"] > 0 else "")
    print(report.CONVENTIONS)
    print()
    hw, on_cpu = _hardware_for(args, args.device), args.device == "cpu"
    print("\n".join(energy.report_lines(rows, measured.seconds, hw, measured=measured,
                                       watts=args.watts, tokens=new_tokens, estimate=on_cpu)))
    _print_generation_energy(rows, measured, args, prompt_tokens, decode_steps, new_tokens)


def _print_generation_energy(rows, measured, args, prompt_tokens, decode_steps, new_tokens) -> None:
    """Prefill and decode joules (metered seconds x power x PUE) and J/token; --energy-json."""
    from minigpt.costs import run_energy

    hw, on_cpu = _hardware_for(args, args.device), args.device == "cpu"
    doc = run_energy.build(rows, measured.seconds, hw, measured, args.watts, new_tokens,
                           estimate=on_cpu)
    run_energy.add_phases(doc, rows, {"prefill": prompt_tokens,
                                      "decode": decode_steps if new_tokens > 1 else 0})
    print(f"energy by phase ({run_energy.summary_line(doc)})")
    for phase in ("prefill", "decode"):
        p = doc["phases"].get(phase)
        if p is None or p["joules"] is None:
            continue
        per = f"{p['j_per_token']:.3g} J/token" if p["j_per_token"] is not None else "-"
        print(f"{phase:<8}  {p['tokens'] or 0:>5} tokens  {p['joules']:9.4g} J  {per}  "
              f"(roofline {p['joules_roofline']:.3g} J)")
    if args.energy_json:
        import json

        from minigpt.costs import report

        report._atomic_write(Path(args.energy_json), json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.energy_json}")


def _costs_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="minigpt costs",
        description="Where the FLOPs, bytes and seconds went: a run's measured records "
        "(<run>/costs.json), with each group's joules at the run's power (<run>/energy.json), or "
        "the closed-form prediction for a config with no run at all.",
        epilog="examples: minigpt costs out/tiny --by layer;  minigpt costs out/tiny --by op "
        "--phase backward --top 10;  minigpt costs --config configs/tiny.toml --batch 32 --seq 128",
    )
    p.add_argument("run", nargs="?", help="a run folder holding costs.json")
    p.add_argument("--config", help="predict for this config instead of reading a run")
    p.add_argument("--batch", type=int, default=None, help="with --config: batch size (default: the config's)")
    p.add_argument("--seq", type=int, default=None, help="with --config: tokens per sequence (default block_size)")
    p.add_argument("--mode", choices=("train", "prefill", "decode"), default="train",
                   help="with --config: one training step, a prefill of --seq tokens, or one decode "
                   "step at position --seq (default train)")
    p.add_argument("--ranks", type=int, default=1,
                   help="with --config --mode train: one rank's step of data-parallel training over "
                   "this many MPI ranks (its batch / ranks sequences, and the allreduces)")
    p.add_argument("--by", choices=("scope", "op", "kind", "layer", "phase"), default="scope",
                   help="group records by this (default scope)")
    p.add_argument("--phase", default=None, help="only this phase (forward, backward, optimizer, eval, ...)")
    p.add_argument("--top", type=int, default=None, help="show the N biggest groups")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--plot", action="store_true",
                   help="with a run: also write layers.png and roofline.png into it (needs matplotlib)")
    p.add_argument("--memory", action="store_true",
                   help="with --config: the memory a training run needs (parameters, gradients, "
                   "optimizer state, activations, largest temporary) against what this machine has")
    return p


def _run_energy_doc(run):
    from minigpt.costs import run_energy

    return run_energy.load(run)


def _plot_run(run, rows) -> None:
    from minigpt.costs import calibrate, hardware, plots

    prof, source = calibrate.local_profile()
    peak, bandwidth = hardware.peak(prof, "fp32"), hardware.require(prof, "memory_bandwidth")
    run = Path(run)
    a = plots.layers_chart(rows, run / "layers.png", f"{run}: training cost per layer")
    b = plots.roofline_chart(rows, run / "roofline.png", peak, bandwidth,
                             f"{run}: training ops against this machine's ceilings ({source})")
    print(f"wrote {a} and {b}")


def _costs_config(where: str):
    """A TOML config, or the config inside a run folder's checkpoint."""
    from minigpt import config, interop

    if Path(where).is_dir() or where.endswith(".npz"):
        return interop.run_config(where)
    return config.load(where)


def cmd_costs(argv) -> int:
    import json

    from minigpt.costs import model as cost_model
    from minigpt.costs import report

    args = _costs_parser().parse_args(argv)
    if (args.run is None) == (args.config is None):
        raise ConfigError("minigpt costs: give a run folder, or --config (not both)")
    run_doc = None
    if args.run is not None and not (Path(args.run) / "costs.json").exists() and \
            (Path(args.run) / "ckpt.npz").exists():
        args.config, args.run = args.run, None  # an imported or initialised run: predict from its config
    if args.config is not None:
        cfg = _costs_config(args.config)
        B = args.batch if args.batch is not None else cfg.train.batch_size
        T = args.seq if args.seq is not None else cfg.model.block_size
        if B < 1 or T < 1:
            raise ConfigError(f"--batch and --seq must be >= 1, got {B} and {T}")
        if T > cfg.model.block_size and args.mode != "decode" or T >= cfg.model.block_size and args.mode == "decode":
            raise ConfigError(f"--seq {T} does not fit block_size {cfg.model.block_size} of {args.config}")
        if args.ranks < 1:
            raise ConfigError(f"--ranks must be >= 1, got {args.ranks}")
        if args.memory:
            return _print_memory(cfg, B, T, args)
        if args.mode == "train" and args.ranks > 1:
            from minigpt.train.dist import local_batch

            records = cost_model.predict_training_step(cfg.model, local_batch(B, args.ranks), T,
                                                       cfg.train.grad_accum, ranks=args.ranks)
            what = (f"predicted: one rank's training step of {args.config}, batch {B} x {T} tokens "
                    f"over {args.ranks} ranks")
        elif args.mode == "train":
            records = cost_model.predict_training_step(cfg.model, B, T, cfg.train.grad_accum)
            what = f"predicted: one training step of {args.config}, batch {B} x {T} tokens"
        elif args.mode == "prefill":
            records = cost_model.predict_forward(cfg.model, B, T, "prefill")
            what = f"predicted: prefill of {T} tokens, batch {B}, {args.config}"
        else:
            records = cost_model.predict_decode(cfg.model, B, T)
            what = f"predicted: one decode step at position {T}, batch {B}, {args.config}"
        rows = report.rows_from_records(records)
    else:
        try:
            doc = report.load(args.run)
        except FileNotFoundError:
            raise ConfigError(f"{args.run}: no costs.json here (train a run first)") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{args.run}/costs.json: unreadable: {e}") from None
        rows = doc["records"]
        what = f"measured: {args.run}, {doc['steps']} steps, {doc['tokens']:,} training tokens"
        if doc.get("ranks", 1) > 1:
            what += f" (rank 0's share, of {doc['ranks']} data-parallel ranks)"
        run_doc = _run_energy_doc(args.run)
    if args.top is not None and args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    from minigpt.costs import run_energy

    groups = report.group(rows, args.by, args.phase, extra=run_energy.row_joules(run_doc))
    energy_note = run_energy.summary_line(run_doc) if run_doc else (
        "no joules: this run has no energy.json" if args.run is not None else "")
    if args.format == "json":
        shown = groups[: args.top] if args.top else groups
        out = {"what": what, "by": args.by, "phase": args.phase, "groups": shown}
        if run_doc:
            out["energy"] = {"watts": run_doc["watts"], "watts_basis": run_doc["watts_basis"],
                             "pue": run_doc["pue"], "note": energy_note}
        print(json.dumps(out, indent=1))
    elif args.format == "csv":
        print(report.groups_csv(groups[: args.top] if args.top else groups), end="")
    else:
        title = f"{what}; by {args.by}" + (f", phase {args.phase}" if args.phase else "")
        print(report.format_table(groups, title=title, top=args.top))
        print(report.CONVENTIONS)
        if energy_note:
            print(energy_note)
    if args.plot:
        if args.run is None:
            raise ConfigError("--plot draws a run's measured costs: give a run folder")
        _plot_run(args.run, rows)
    return 0


def _print_memory(cfg, B: int, T: int, args) -> int:
    import json

    from minigpt.costs import memory

    if args.mode != "train":
        raise ConfigError("--memory estimates a training run: drop --mode")
    ranks = args.ranks
    if ranks > 1:
        from minigpt.train.dist import local_batch

        B = local_batch(B, ranks)
    items = memory.training_estimate(cfg, B, T)
    title = (f"memory of a training run of {args.config}: batch {B} x {T} tokens, "
             f"{cfg.train.dtype}, grad_accum {cfg.train.grad_accum} (one micro-batch alive at a time)"
             + (f"; one of {ranks} ranks, each holding its share of the batch" if ranks > 1 else ""))
    if args.format == "json":
        avail, where = memory.available_bytes()
        print(json.dumps({"what": title, "items": [i.__dict__ for i in items],
                          "total": memory.total(items), "available": avail, "available_source": where},
                         indent=1))
    else:
        print(memory.format_table(items, title))
        if ranks > 1:
            print(f"{ranks} ranks on one machine: {memory.gib(ranks * memory.total(items))}")
        print(f"the corpus adds up to {memory.gib(cfg.data.max_bytes)} of tokens ([data] max_bytes, "
              "byte tokenizer); the allocator and BLAS add about 5-20% on top (docs/reliability.md)")
    return 0


def cmd_report(argv) -> int:
    from minigpt import report_html

    p = _Parser(prog="minigpt report",
                description="Write <run>/report.html: one self-contained page (inline SVG, nothing "
                "fetched) with the loss curves, cost and joules per layer, the roofline, the four "
                "energy layers and the GPT-3 projection. Training writes it too; this redraws it.",
                epilog="example: minigpt report out/tiny && xdg-open out/tiny/report.html")
    p.add_argument("run", help="a run folder holding costs.json (and log.jsonl, energy.json)")
    args = p.parse_args(argv)
    print(f"wrote {report_html.write(args.run)}")
    return 0


def cmd_calibrate(argv) -> int:
    from minigpt.costs import calibrate

    p = _Parser(prog="minigpt calibrate",
                description="Measure this machine's float32/float64 matmul FLOP/s and memory bandwidth "
                "and save them as the local-cpu hardware profile ($MINIGPT_HOME/hardware, default "
                "~/.minigpt/hardware), used for utilisation and roofline figures.")
    p.add_argument("--quick", action="store_true", help="smaller, faster benchmarks (less exact)")
    p.add_argument("--no-save", action="store_true", help="print the figures only")
    args = p.parse_args(argv)
    print("measuring (a few seconds)...", file=sys.stderr)
    m = calibrate.measure(quick=args.quick)
    print(f"float32 matmul: {m['fp32'] / 1e9:8.1f} GFLOP/s")
    print(f"float64 matmul: {m['fp64'] / 1e9:8.1f} GFLOP/s")
    print(f"memory copy:    {m['bandwidth'] / 1e9:8.1f} GB/s (read + write)")
    if not args.no_save:
        print(f"saved {calibrate.save(calibrate.profile_toml(m))}")
    return 0


def cmd_quantize(argv) -> int:
    import minigpt
    from minigpt.train import checkpoint

    p = _Parser(prog="minigpt quantize",
                description="Write an int8 checkpoint of a trained run: every linear layer's weights and "
                "the (tied) token table in int8 with one float32 scale per output channel.",
                epilog="example: minigpt quantize out/tiny -o out/tiny-int8 && "
                "python generate.py out/tiny-int8 --prompt 'def '")
    p.add_argument("run", help="a run folder or checkpoint file")
    p.add_argument("-o", "--output", required=True, help="a folder (gets ckpt.npz) or a .npz file")
    p.add_argument("--mode", choices=("w8a32", "w8a8"), default="w8a8", help="inference mode stored (default w8a8)")
    p.add_argument("--int8-embedding", action="store_true", help="read the token embedding from int8 too")
    p.add_argument("--kv-int8", action="store_true", help="keep the KV cache in int8 when generating")
    p.add_argument("--outlier-threshold", type=float, default=None, help="w8a8 outlier threshold")
    args = p.parse_args(argv)
    model = minigpt.load(args.run)
    if model.gpt.quant is not None:
        raise ConfigError(f"{args.run}: already an int8 checkpoint")
    model.quantize(args.mode, args.int8_embedding, args.kv_int8, args.outlier_threshold)
    path = Path(args.output)
    if path.suffix != ".npz":
        path = path / checkpoint.FILENAME
    model.save_int8(path)
    from minigpt.evaluate import weight_bytes

    fp32 = model.gpt.params.data.nbytes
    print(f"wrote {path}: {args.mode}, weights {weight_bytes(model.gpt):,} bytes (fp32: {fp32:,})")
    return 0


def cmd_eval(argv) -> int:
    import json

    import minigpt
    from minigpt.evaluate import evaluate

    p = _Parser(prog="minigpt eval",
                description="Validation loss and perplexity of a run; with --int8, the quantized model "
                "against fp32: relative loss change, KL divergence of the next-token distributions, "
                "top-1 agreement, weight bytes and bytes moved per generated token.",
                epilog="example: minigpt eval out/tiny --int8 w8a8 --format json")
    p.add_argument("run", help="a run folder or checkpoint file")
    _int8_arguments(p)
    p.add_argument("--max-tokens", type=int, default=1 << 17, help="validation tokens to use (default 131072)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    model = minigpt.load(args.run)
    reference = None
    if args.int8 is not None:
        if model.gpt.quant is not None:
            raise ConfigError(f"{args.run}: already an int8 checkpoint; evaluate it without --int8")
        reference = minigpt.load(args.run)
        _apply_int8(model, args)
    result = evaluate(model, reference, args.max_tokens)
    mode = (model.gpt.quant.qcfg.mode if model.gpt.quant is not None else "fp32")
    result = {"run": str(args.run), "mode": mode} | result
    if args.format == "json":
        print(json.dumps(result, indent=1))
    else:
        for k, v in result.items():
            shown = f"{v:.6g}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else v)
            print(f"{k:<16} {shown}")
    return 0


def cmd_hardware(argv) -> int:
    from minigpt.costs import hardware

    p = _Parser(prog="minigpt hardware",
                description="List the hardware profiles (packaged, and yours in $MINIGPT_HOME/hardware), "
                "or show one with its sources.")
    p.add_argument("name", nargs="?", help="show this profile's figures and sources")
    args = p.parse_args(argv)
    if args.name is None:
        print(hardware.format_profiles_table(hardware.list_profiles()))
        return 0
    prof = hardware.load_profile(args.name)
    print(f"{prof.name}: {prof.description}  ({prof.path})")
    figures = [(f"peak_flops.{t}", v) for t, v in prof.peak_flops.items()]
    figures += [(f, getattr(prof, f)) for f in hardware.FIGURES + hardware.OPTIONAL_FIGURES]
    figures += [(f"interconnect.{k}", v) for k, v in prof.interconnect.items()]  # bytes/s each way
    for key, value in figures:
        shown = f"{value:.4g}" if value is not None else prof.missing.get(key, "unknown")
        print(f"  {key:<23} {shown:>12}  {prof.sources.get(key, '')}")
    return 0


SCALE_HELP = """scenario keys (full list: minigpt/costs/scenario.py's docstring; docs/energy.md):
  [model]      n_layer, n_embd, n_head, block_size, vocab_size (an architecture) and/or params,
               active_params; n_experts, experts_per_token. Not needed for [training] flops alone
  [training]   the work in the source's own terms: flops (a published total), tokens (FLOPs by
               our closed form, or 6ND), chip_hours (GPU-hours), or days (with hardware.chips).
               With FLOPs give a rate (hardware.mfu / achieved_flops_per_chip) or a duration;
               the other is derived (implied FLOP/s per chip, MFU). Missing: "not given"
  [inference]  prompt_tokens, output_tokens, batch, weight_bits, kv_bits, chips, queries_per_day;
               mfu: compute-bound Wh/query (FLOPs / (peak x mfu) x W x PUE), else the roofline;
               wh_per_query: a stated figure, used instead of both (wh_per_query_basis says which)
  [hardware]   profile, chips, mfu | achieved_flops_per_chip, dtype, memory_bandwidth;
               watts_per_chip, or power_basis = "chip" (rated TDP, default) | "system" (whole
               system per accelerator, e.g. DGX A100 6.5 kW / 8); power_fraction (average draw
               as a share of the rating, default 1); pue; carbon_kg_per_kwh (gross),
               carbon_net_kg_per_kwh (net: co2_net_tonnes); water_onsite_l_per_kwh (per IT kWh,
               before PUE; alias water_l_per_kwh), water_offsite_l_per_kwh (per kWh drawn)
  [published]  source and the figures the source gives: shown beside ours with the difference
energy = chip-hours x W x power_fraction x PUE; tCO2e = MWh x grid; water = IT MWh x on-site
+ MWh x off-site (m3). Every report names the power basis.
examples: minigpt scale gpt3-175b;  minigpt scale patterson-t5 (FLOPs alone);  minigpt scale
llama-65b (GPU-hours);  minigpt scale gpt4-class-moe --set hardware.power_basis=chip;  minigpt
scale epoch-chatgpt-2025 (compute-bound Wh/query);  minigpt scale dense-70b-h100 --set
inference.weight_bits=8;  shipped scenarios: configs/scale/*.toml (docs/energy.md)"""


def _scale_parser() -> argparse.ArgumentParser:
    import textwrap

    p = _Parser(
        prog="minigpt scale",
        description=textwrap.fill("What a model costs at full size, from a published estimate's own inputs "
        "(FLOPs, GPU-hours or days; chips, rate, watts on a stated power basis, PUE, grid): "
        "training FLOPs (our closed form beside 6ND), days, MWh, tCO2e gross and net, water "
        "on-site and off-site, households; serving bytes, tokens/s ceilings, Wh, gCO2e and mL "
        "per query; with every assumption and where it came from, a utilisation x PUE "
        "sensitivity table, and the source's own figures beside ours.", 96),
        epilog=SCALE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", help="a scenario TOML file, or a shipped one's name (gpt3-175b)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field (repeatable), e.g. --set hardware.mfu=0.4")
    p.add_argument("--format", choices=("table", "json"), default="table")
    return p


def cmd_scale(argv) -> int:
    import json

    from minigpt.costs import scale_report, scenario

    args = _scale_parser().parse_args(argv)
    result = scale_report.estimate(scenario.load(args.scenario, args.overrides))
    if args.format == "json":
        print(json.dumps(scale_report.to_json(result), indent=1))
    else:
        print(scale_report.format_table(result))
    return 0


# ----------------------------------------------------------------------------- GPT-2 interop (issue 13)


def cmd_import(argv) -> int:
    from minigpt import interop

    p = _Parser(prog="minigpt import",
                description="Turn a Hugging Face GPT-2 folder (config.json + model.safetensors, any of "
                "the four sizes; fp32, fp16 or bf16; vocab.json + merges.txt if present) into a run "
                "folder that generate.py, minigpt costs/eval/quantize and minigpt.load accept. "
                "Pickled pytorch_model.bin files are refused.",
                epilog="example: minigpt import ~/gpt2 out/gpt2 && python generate.py out/gpt2 "
                "--prompt 'Hello' && minigpt costs out/gpt2 --mode decode")
    p.add_argument("hf_dir", help="a folder holding config.json and model.safetensors")
    p.add_argument("run_dir", help="the run folder to write (gets ckpt.npz)")
    args = p.parse_args(argv)
    info = interop.import_hf(args.hf_dir, args.run_dir)
    c = info["config"]
    print(f"imported {info['params']:,} parameters ({', '.join(info['dtypes'])} -> float32): "
          f"{c['n_layer']} layers, {c['n_head']} heads, width {c['n_embd']}, context {c['block_size']}, "
          f"vocab {c['vocab_size']} -> {args.run_dir}")
    if info["tokenizer"] == "none":
        print("note: no vocab.json + merges.txt in the folder: the run has no tokenizer, so text "
              "prompts cannot be encoded (generate --prompt-ids works)", file=sys.stderr)
    return 0


def cmd_export(argv) -> int:
    import minigpt
    from minigpt import interop

    p = _Parser(prog="minigpt export",
                description="Write a run as a Hugging Face GPT-2 folder: config.json, model.safetensors "
                "(fp32) and the tokenizer's vocab.json + merges.txt, which "
                "transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR) loads.",
                epilog="example: minigpt export out/tiny out/tiny-hf --format hf")
    p.add_argument("run", help="a run folder or checkpoint file")
    p.add_argument("out_dir", help="the folder to write")
    p.add_argument("--format", choices=("hf",), default="hf", help="hf: Hugging Face GPT-2 (the only one)")
    args = p.parse_args(argv)
    for path in interop.export_hf(minigpt.load(args.run), args.out_dir):
        print(f"wrote {path}")
    return 0


def cmd_init(argv) -> int:
    import numpy as np

    from minigpt import config, interop
    from minigpt.nn.params import init

    p = _Parser(prog="minigpt init",
                description="A run folder of GPT-2-initialised weights for a config, no training and no "
                "optimizer state (so a 1558M model needs its 6.2 GB of fp32 parameters, not three "
                "times that): for generate, minigpt costs and bench/decode.py at real size.",
                epilog="example: minigpt init configs/gpt2-124m.toml out/gpt2-124m-random && "
                "python bench/decode.py out/gpt2-124m-random")
    p.add_argument("config", help="a TOML config, e.g. configs/gpt2-124m.toml")
    p.add_argument("run_dir", help="the run folder to write (gets ckpt.npz)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config field (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="weights' seed (default: [train] seed)")
    args = p.parse_args(argv)
    cfg = config.load(args.config, args.overrides)
    cfg.train.out_dir = args.run_dir
    tokenizer = _init_tokenizer(cfg)
    seed = cfg.train.seed if args.seed is None else args.seed
    params = init(cfg.model, np.random.default_rng(seed), "float32")
    path = interop.write_run(args.run_dir, cfg, params.data, tokenizer, {"initialised_seed": seed})
    print(f"wrote {path}: {params.size:,} parameters, GPT-2 initialisation (seed {seed}), untrained")
    return 0


def _init_tokenizer(cfg):
    """bytes; a BPE from [data] tokenizer_path; with neither, no tokenizer (learning 50,000 merges
    is a training job, not an init)."""
    from minigpt.interop import MissingTokenizer
    from minigpt.tokenizer import ByteTokenizer

    if cfg.data.tokenizer == "bytes":
        return ByteTokenizer()
    if not cfg.data.tokenizer_path:
        print("note: [data] tokenizer = \"bpe\" with no tokenizer_path: the run has no tokenizer, so "
              "text prompts cannot be encoded (generate --prompt-ids works)", file=sys.stderr)
        return MissingTokenizer(cfg.model.vocab_size)
    from minigpt.tokenizer_bpe import BPETokenizer

    tok = BPETokenizer.load(Path(cfg.data.tokenizer_path).expanduser())
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"[model] vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size}")
    return tok


COMMANDS = {
    "train": (cmd_train, "train a model from a TOML config"),
    "generate": (cmd_generate, "write text with a trained model"),
    "costs": (cmd_costs, "FLOPs, bytes and seconds by layer, op or phase (measured or predicted)"),
    "report": (cmd_report, "write a run's report.html (loss, cost per layer, roofline, energy)"),
    "calibrate": (cmd_calibrate, "measure this machine's matmul FLOP/s and memory bandwidth"),
    "hardware": (cmd_hardware, "list hardware profiles, or show one with its sources"),
    "scale": (cmd_scale, "training and serving cost, energy and carbon of a model at full size"),
    "quantize": (cmd_quantize, "write an int8 checkpoint of a run"),
    "eval": (cmd_eval, "validation loss, perplexity, and int8 against fp32"),
    "import": (cmd_import, "a Hugging Face GPT-2 folder (safetensors) -> a run folder"),
    "export": (cmd_export, "a run folder -> a Hugging Face GPT-2 folder"),
    "init": (cmd_init, "a run folder of GPT-2-initialised weights for a config (no training)"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: minigpt <command> [options]   (minigpt <command> --help for each)", "", "commands:"]
        lines += [f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items()]
        if argv and argv[0] not in ("-h", "--help"):
            print(f"minigpt: unknown command {argv[0]!r}\n" + "\n".join(lines), file=sys.stderr)
            return EXIT_BAD_INPUT
        print("\n".join(lines))
        return 0 if argv else EXIT_BAD_INPUT
    return run(COMMANDS[argv[0]][0], argv[1:])


def run(command, argv) -> int:
    """Run a command; bad input becomes one line on stderr and exit code 2."""
    from minigpt.train.trainer import TrainingDiverged

    try:
        return command(argv)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MiniGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        print("error: out of memory: this machine cannot hold what the command asked for (a model, "
              "batch or file too large); try a smaller one (minigpt costs --config CONFIG --memory "
              "estimates a training run)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # a writer outside safeio (a plot, a prompt file): still one line
        from minigpt.safeio import reason

        print(f"error: {e.filename or 'a file'}: {reason(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
