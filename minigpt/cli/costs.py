"""The cost tools: `minigpt costs` (measured or predicted, by layer/op/kind/phase, with joules and
the memory estimate), `report`, `calibrate`, `hardware` and `scale`."""

import argparse
import sys
from pathlib import Path

from minigpt.cli.common import Parser
from minigpt.errors import ConfigError


def _costs_parser() -> argparse.ArgumentParser:
    p = Parser(
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
    from minigpt.energy import run_energy

    return run_energy.load(run)


def _plot_run(run, rows) -> None:
    from minigpt.hardware import calibrate, profiles
    from minigpt.report import plots

    prof, source = calibrate.local_profile()
    peak, bandwidth = profiles.peak(prof, "fp32"), profiles.require(prof, "memory_bandwidth")
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

    from minigpt.counting import closed_form as cost_model
    from minigpt.counting import tables

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
        from minigpt.nn import layers

        # the schedule a run on this machine records: the fused kernels' on the CPU with Numba
        fused = layers.fused() and cfg.train.device == "cpu"
        if args.mode == "train" and args.ranks > 1:
            from minigpt.train.dist import local_batch

            records = cost_model.predict_training_step(cfg.model, local_batch(B, args.ranks), T,
                                                       cfg.train.grad_accum, ranks=args.ranks, fused=fused)
            what = (f"predicted: one rank's training step of {args.config}, batch {B} x {T} tokens "
                    f"over {args.ranks} ranks")
        elif args.mode == "train":
            records = cost_model.predict_training_step(cfg.model, B, T, cfg.train.grad_accum, fused=fused)
            what = f"predicted: one training step of {args.config}, batch {B} x {T} tokens"
        elif args.mode == "prefill":
            records = cost_model.predict_forward(cfg.model, B, T, "prefill", fused=fused)
            what = f"predicted: prefill of {T} tokens, batch {B}, {args.config}"
        else:
            records = cost_model.predict_decode(cfg.model, B, T, fused=fused)
            what = f"predicted: one decode step at position {T}, batch {B}, {args.config}"
        rows = tables.rows_from_records(records)
        what += " (the fused kernels' schedule)" if fused else ""
    else:
        if args.memory:
            raise ConfigError("--memory estimates a training run from a config: give --config "
                              "(a run's measured costs have no memory estimate)")
        try:
            doc = tables.load(args.run)
        except FileNotFoundError:
            raise ConfigError(f"{args.run}: no costs.json here (train a run first)") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{args.run}/costs.json: unreadable: {e}") from None
        rows = doc["records"]
        what = f"measured: {args.run}, {doc['steps']} steps, {doc['tokens']:,} training tokens"
        if doc.get("ranks", 1) > 1:
            what += f" (rank 0's share, of {doc['ranks']} data-parallel ranks)"
        run_doc = _run_energy_doc(args.run)
    phases = sorted({r["phase"] for r in rows})
    if args.phase is not None and args.phase not in phases:
        raise ConfigError(f"--phase: no records of phase {args.phase!r}; the records' phases: "
                          f"{', '.join(phases)}")
    if args.top is not None and args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    from minigpt.energy import run_energy

    groups = tables.group(rows, args.by, args.phase, extra=run_energy.row_joules(run_doc))
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
        print(tables.groups_csv(groups[: args.top] if args.top else groups), end="")
    else:
        title = f"{what}; by {args.by}" + (f", phase {args.phase}" if args.phase else "")
        print(tables.format_table(groups, title=title, top=args.top))
        print(tables.CONVENTIONS)
        if energy_note:
            print(energy_note)
    if args.plot:
        if args.run is None:
            raise ConfigError("--plot draws a run's measured costs: give a run folder")
        _plot_run(args.run, rows)
    return 0


def _print_memory(cfg, B: int, T: int, args) -> int:
    import json

    from minigpt.counting import memory

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
    from minigpt.report import html

    p = Parser(prog="minigpt report",
               description="Write <run>/report.html: one self-contained page (inline SVG, nothing "
               "fetched) with the loss curves, cost and joules per layer, the roofline, the four "
               "energy layers and the GPT-3 projection. Training writes it too; this redraws it.",
               epilog="example: minigpt report out/tiny && xdg-open out/tiny/report.html")
    p.add_argument("run", help="a run folder holding costs.json (and log.jsonl, energy.json)")
    args = p.parse_args(argv)
    print(f"wrote {html.write(args.run)}")
    return 0


def cmd_calibrate(argv) -> int:
    from minigpt.hardware import calibrate

    p = Parser(prog="minigpt calibrate",
               description="Measure this machine's float32/float64 matmul FLOP/s and memory bandwidth "
               "and save them as the local-cpu hardware profile ($MINIGPT_HOME/hardware, default "
               "~/.minigpt/hardware), used for utilisation and roofline figures.")
    p.add_argument("--quick", action="store_true", help="smaller, faster benchmarks (less exact)")
    p.add_argument("--no-save", action="store_true", help="print the figures only")
    args = p.parse_args(argv)
    print("measuring (a few seconds)...", file=sys.stderr)
    m = calibrate.measure(quick=args.quick)
    print(f"float32 matmul: {m.fp32 / 1e9:8.1f} GFLOP/s")
    print(f"float64 matmul: {m.fp64 / 1e9:8.1f} GFLOP/s")
    print(f"memory copy:    {m.bandwidth / 1e9:8.1f} GB/s (read + write)")
    if not args.no_save:
        print(f"saved {calibrate.save(calibrate.profile_toml(m))}")
    return 0


def cmd_hardware(argv) -> int:
    from minigpt.hardware import profiles

    p = Parser(prog="minigpt hardware",
               description="List the hardware profiles (packaged, and yours in $MINIGPT_HOME/hardware), "
               "or show one with its sources.")
    p.add_argument("name", nargs="?", help="show this profile's figures and sources")
    args = p.parse_args(argv)
    if args.name is None:
        print(profiles.format_profiles_table(profiles.list_profiles()))
        return 0
    prof = profiles.load_profile(args.name)
    print(f"{prof.name}: {prof.description}  ({prof.path})")
    figures = [(f"peak_flops.{t}", v) for t, v in prof.peak_flops.items()]
    figures += [(f, getattr(prof, f)) for f in profiles.FIGURES + profiles.OPTIONAL_FIGURES]
    figures += [(f"interconnect.{k}", v) for k, v in prof.interconnect.items()]  # bytes/s each way
    for key, value in figures:
        shown = f"{value:.4g}" if value is not None else prof.missing.get(key, "unknown")
        print(f"  {key:<23} {shown:>12}  {prof.sources.get(key, '')}")
    return 0


SCALE_HELP = """scenario keys (full list: minigpt/scale/scenario.py's docstring; docs/energy.md):
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
inference.weight_bits=8;  shipped scenarios: minigpt/scale/scenarios/*.toml (docs/energy.md)"""


def _scale_parser() -> argparse.ArgumentParser:
    import textwrap

    p = Parser(
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

    from minigpt.scale import estimate, scenario, table

    args = _scale_parser().parse_args(argv)
    result = estimate.estimate(scenario.load(args.scenario, args.overrides))
    if args.format == "json":
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(table.format_table(result))
    return 0


# ----------------------------------------------------------------------------- GPT-2 interop (issue 13)
