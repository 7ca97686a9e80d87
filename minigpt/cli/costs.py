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
        "--phase backward --top 10;  minigpt costs --config configs/tiny.toml --batch 32 --seq 128;  "
        "minigpt costs --config configs/tiny.toml --predict --steps 100",
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
    p.add_argument("--predict", action="store_true",
                   help="with --config: predicted seconds and joules here, per layer, per phase and "
                   "for the whole run (--steps steps, a training run's evaluations included), from "
                   "this machine's time model (measured and cached on first use; minigpt calibrate "
                   "measures carefully)")
    p.add_argument("--steps", type=int, default=None,
                   help="with --predict: steps of --mode (default: the config's max_steps)")
    p.add_argument("--watts", type=float, default=None,
                   help="with --predict: this machine's power draw in W (default: the local "
                   "profile's, else an estimate from the CPU's rated power)")
    p.add_argument("--memory", action="store_true",
                   help="with --config: the memory a training run needs (parameters, gradients, "
                   "optimizer state, activations, largest temporary) against what this machine has")
    return p


def _run_energy_doc(run):
    from minigpt.energy import run_energy

    return run_energy.load(run)


def _ceilings(run_doc, rows) -> tuple[str, list[dict]] | None:
    """The line saying which roofline ceilings the run's joules_roofline used, and the same as
    JSON; None without a stored profile (or when it lacks a figure the rows need)."""
    from minigpt.energy import run_energy
    from minigpt.hardware import roofline

    if not run_doc or not run_doc.get("profile"):
        return None
    prof = run_energy.profile_from_doc(run_doc["profile"])
    try:
        used = roofline.by_ceiling(rows, prof)
        line = roofline.ceilings_line(rows, prof)
    except ConfigError:
        return None
    total = sum(used.values()) or 1.0
    return line, [{"name": c.name, "value": c.value, "how": c.how, "share_of_ideal_seconds": s / total}
                  for c, s in used.items()]


def _plot_run(run, rows) -> None:
    from minigpt.hardware import calibrate, profiles, roofline
    from minigpt.report import plots

    prof, source = calibrate.local_profile()
    peak = profiles.peak(prof, "fp32")
    slopes = {roofline.memory_ceiling(prof, r["bytes_read"], r["bytes_written"])
              for r in rows if r["bytes_read"] + r["bytes_written"]}
    bandwidths = [(c.name, c.value) for c in sorted(slopes, key=lambda c: -c.value)]
    run = Path(run)
    a = plots.layers_chart(rows, run / "layers.png", f"{run}: training cost per layer")
    b = plots.roofline_chart(rows, run / "roofline.png", peak, bandwidths,
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
        if args.predict:
            return _print_prediction(cfg, B, T, args)
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
        if args.predict:
            raise ConfigError("--predict forecasts a run from a config: give --config")
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
    ceilings = _ceilings(run_doc, [r for r in rows if args.phase in (None, r["phase"])])
    if args.format == "json":
        shown = groups[: args.top] if args.top else groups
        out = {"what": what, "by": args.by, "phase": args.phase, "groups": shown}
        if run_doc:
            out["energy"] = {"watts": run_doc["watts"], "watts_basis": run_doc["watts_basis"],
                             "pue": run_doc["pue"], "note": energy_note}
        if ceilings:
            out["roofline_ceilings"] = ceilings[1]
        print(json.dumps(out, indent=1))
    elif args.format == "csv":
        print(tables.groups_csv(groups[: args.top] if args.top else groups), end="")
    else:
        title = f"{what}; by {args.by}" + (f", phase {args.phase}" if args.phase else "")
        print(tables.format_table(groups, title=title, top=args.top))
        print(tables.CONVENTIONS)
        if energy_note:
            print(energy_note)
        if ceilings:
            print(ceilings[0])
    if args.plot:
        if args.run is None:
            raise ConfigError("--plot draws a run's measured costs: give a run folder")
        _plot_run(args.run, rows)
    return 0


def _print_prediction(cfg, B: int, T: int, args) -> int:
    """`minigpt costs --config C --predict`: the forecast's table, or its JSON."""
    import json

    from minigpt import units
    from minigpt.energy import accounting, forecast
    from minigpt.train import timing_runs

    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.watts is not None and not args.watts > 0:
        raise ConfigError(f"--watts must be > 0, got {args.watts}")
    if args.ranks > 1:
        raise ConfigError("--predict forecasts one process: drop --ranks")
    if args.format == "csv":
        raise ConfigError("--predict prints a table or JSON: --format table or json")
    prof, _ = accounting.find_profile("local-cpu")
    f = forecast.forecast(cfg, timing_runs.time_model(), args.mode, args.steps, B, T, prof,
                          args.watts)
    kind = {"train": "training steps", "prefill": "prefills", "decode": "decode steps"}[args.mode]
    where = f"positions {T}.." if args.mode == "decode" else f"{T} tokens"
    what = (f"predicted here: {f.steps} {kind} of {args.config}, batch {B} x {where} "
            f"(time model: {f.provenance})")
    if args.format == "json":
        print(json.dumps({"what": what} | f.to_json(), indent=1))
        return 0
    doc = f.to_json()
    print(what)
    scale = (f.power.watts or 0.0) * f.pue
    cells = [(g["name"], f"{g['seconds_per_step']:.4g}", f"{100 * g['seconds_per_step'] / f.seconds_per_step:.1f}",
              units.si(g["seconds_per_step"] * scale, "J") if f.power.watts else "-")
             for g in doc["layers"]]
    print("\n".join(units.rows_text(("layer", "s/step", "%", "J/step"), cells, align="<>>>")))
    cells = [(g["name"], f"{g['seconds_per_step']:.4g}") for g in doc["phases"]]
    cells.append(("unmetered", f"{f.unmetered_per_step:.4g}"))
    print("\n".join(units.rows_text(("phase", "s/step"), cells, align="<>", rule=False)))
    print("(unmetered: Python between the ops, per step; eval: one validation forward)")
    print(f"one step: {f.seconds_per_step:.4g} s" + (
        f"; {forecast.plural(f.evaluations, 'evaluation')} of {cfg.eval.batches} batches: "
        f"{f.seconds_per_evaluation:.4g} s each"
        if f.evaluations else ""))
    energy = (f"{units.si(f.joules, 'J')} ({doc['wh']:.3g} Wh) = {f.seconds:.4g} s x "
              f"{f.power.watts:.3g} W ({f.power.note}) x PUE {f.pue:.2f}" if f.joules is not None
              else f"none: {f.power.note}")
    print(f"whole run: {forecast.headline(f)}")
    print(f"energy: {energy}")
    if f.suspect:
        print(f"note: the time model was {f.suspect}")
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
    from minigpt.hardware import calibrate, timing
    from minigpt.train import timing_runs

    p = Parser(prog="minigpt calibrate",
               description="Measure this machine's float32/float64 matmul FLOP/s and memory bandwidth "
               "(read, write, copy and triad, on one thread and on all cores, as STREAM does) and save "
               "them as the local-cpu hardware profile ($MINIGPT_HOME/hardware, default "
               "~/.minigpt/hardware), used for utilisation and roofline figures: each op is held "
               "against the bandwidth its read/write mix fits (docs/costs.md); and measure the "
               "time model (products on a grid of shapes, the model's elementwise ops, the cost "
               "between ops) that `minigpt costs --predict` and train.py's prediction use "
               "($MINIGPT_HOME/hardware/local-timing.json).")
    p.add_argument("--quick", action="store_true", help="smaller, faster benchmarks (less exact)")
    p.add_argument("--no-save", action="store_true", help="print the figures only")
    p.add_argument("--check", action="store_true",
                   help="compare the figures in use (the local-cpu profile, else the cached quick "
                   "measurement) with a fresh quick measurement; a fresh figure above a cached "
                   "quick one replaces it")
    args = p.parse_args(argv)
    if args.check:
        return _calibrate_check()
    print("measuring (a few seconds; the time model a minute or so)...", file=sys.stderr)
    m = calibrate.measure(quick=args.quick)
    print(f"float32 matmul: {m.fp32 / 1e9:8.1f} GFLOP/s")
    print(f"float64 matmul: {m.fp64 / 1e9:8.1f} GFLOP/s")
    print(f"memory copy:    {m.bandwidth / 1e9:8.1f} GB/s (read + write)")
    if m.stream:
        from minigpt.hardware import bandwidth

        print()
        matvec = (calibrate.MATVEC_MIB, m.matvec) if m.matvec else None
        print("\n".join(bandwidth.table_lines(m.stream, matvec)))
        print("bytes counted as the meter counts them (read + written); best of "
              f"{m.stream[0].repeats} passes each; the roofline holds each op against the kind "
              "its read/write mix fits, the better of 1 thread and all cores")
    tm = timing_runs.measure(quick=args.quick)
    print(f"time model:     products {tm.rate(1024, 1024, 1024) / 1e9:.1f} GFLOP/s at 1024^3, "
          f"{tm.stream_bandwidth / 1e9:.1f} GB/s streaming weights, {tm.call_s * 1e6:.2g} us a "
          f"call; {len(tm.elementwise) - 1} elementwise ops ({timing.provenance(tm)})")
    if tm_note := timing.suspect(tm):
        print(f"note: {tm_note}")
    if not args.no_save:
        print(f"saved {calibrate.save(calibrate.profile_toml(m))}")
        print(f"saved {timing.save(tm, timing.calibrated_path())}")
    return 0


def _calibrate_check() -> int:
    """`minigpt calibrate --check`: the figures in use beside a fresh quick measurement."""
    from minigpt import units
    from minigpt.hardware import calibrate, profiles

    prof, note = calibrate.local_profile()
    print("measuring (a few seconds)...", file=sys.stderr)
    fresh, meta = calibrate.measure_quick()
    cells, higher = [], []
    for label, key, value in (("float32 matmul", "fp32", fresh.fp32),
                              ("float64 matmul", "fp64", fresh.fp64),
                              ("memory copy", "memory_bandwidth", fresh.bandwidth)):
        cached = (profiles.require(prof, key) if key == "memory_bandwidth"
                  else profiles.peak(prof, key))
        ratio = value / cached
        cells.append((label, f"{cached / 1e9:.1f}", f"{value / 1e9:.1f}", f"{ratio:.2f}",
                      "suspect" if abs(ratio - 1) > 0.15 else "agrees"))
        higher.append(value > cached)
    for f in fresh.stream:  # read/write/copy/triad, 1 thread and all cores
        cached = prof.bandwidth.get(f.key)
        if cached:
            ratio = f.bytes_per_s / cached
            cells.append((f"{f.kind}, {f.threading.replace('_', ' ')}", f"{cached / 1e9:.1f}",
                          f"{f.bytes_per_s / 1e9:.1f}", f"{ratio:.2f}",
                          "suspect" if abs(ratio - 1) > 0.15 else "agrees"))
            higher.append(f.bytes_per_s > cached)
    print(f"in use: {prof.name} ({note}); fresh: a quick measurement now, load average "
          f"{max(meta['load_average']):.2g} on {meta['cores']} cores")
    print("\n".join(units.rows_text(("figure", "in use G/s", "fresh G/s", "fresh/used", ""), cells,
                                    align="<>>><")))
    if prof.name == calibrate.QUICK_NAME:
        print(f"the cached figures: {calibrate.cache_meta().get('measured_at', 'when unknown')}")
        if any(higher):
            old = calibrate._figures_of(prof)
            best = old._replace(fp32=max(old.fp32, fresh.fp32), fp64=max(old.fp64, fresh.fp64),
                                bandwidth=max(old.bandwidth, fresh.bandwidth),
                                stream=calibrate.higher_stream(old.stream, fresh.stream))
            calibrate._write_quick(best, meta)
            print(f"replaced the cached quick figures with the higher of each ({calibrate.cache_path()})")
    elif any(r[-1] == "suspect" for r in cells):
        print("the local-cpu profile disagrees with this machine now: run `minigpt calibrate` "
              "on a quiet machine")
    if calibrate.suspect_note(meta):
        print(f"note: the fresh measurement was taken under load too (load average "
              f"{max(meta['load_average']):.2g} on {meta['cores']} cores): compare again when the "
              f"machine is quiet")
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
    figures += [(f"bandwidth.{k}", v) for k, v in prof.bandwidth.items()]  # measured STREAM, bytes/s
    for key, value in figures:
        shown = f"{value:.4g}" if value is not None else prof.missing.get(key, "unknown")
        how = prof.notes.get(key, "") if key.startswith("bandwidth.") else ""
        print(f"  {key:<23} {shown:>12}  {prof.sources.get(key, '')}" + (f"; {how}" if how else ""))
    return 0


SCALE_HELP = """scenario keys (full list: minigpt/scale/scenario.py's docstring; docs/energy.md):
  [model]      n_layer, n_embd, n_head, block_size, vocab_size (an architecture) and/or params,
               active_params; n_experts, experts_per_token. Not needed for [training] flops alone
  [training]   the work in the source's own terms: flops (a published total), tokens (FLOPs by
               our closed form, or 6ND), chip_hours (GPU-hours), or days (with hardware.chips).
               With FLOPs give a rate (hardware.mfu / achieved_flops_per_chip) or a duration;
               the other is derived (implied FLOP/s per chip, MFU). Missing: "not given".
               energy_mwh: a published training energy (alone allowed), for breakeven_days
  [inference]  prompt_tokens, output_tokens, batch, weight_bits, kv_bits, chips, queries_per_day;
               tokens_per_s, latency_s: the throughput form ((output / tokens_per_s + latency) x
               (accelerator + host W) x PUE); mfu: compute-bound Wh/query (FLOPs / (peak x mfu)
               x W x PUE), else the roofline; wh_per_query: a stated figure, used instead of all
               (wh_per_query_basis says which); accelerator_share, host_share, idle_share: the
               split into wh_per_query_boundaries (overhead the rest, = 1 - 1/PUE)
  [hardware]   profile, chips, mfu | achieved_flops_per_chip, dtype, memory_bandwidth;
               watts_per_chip, or power_basis = "chip" (rated TDP, default) | "system" (whole
               system per accelerator, e.g. DGX A100 6.5 kW / 8); power_fraction (average draw
               as a share of the rating, default 1); pue; carbon_kg_per_kwh (gross),
               carbon_net_kg_per_kwh (net: co2_net_tonnes); water_onsite_l_per_kwh (per IT kWh,
               before PUE; alias water_l_per_kwh), water_offsite_l_per_kwh (per kWh drawn);
               accelerator_utilization, host_watts, host_utilization (the throughput form)
  [published]  source and the figures the source gives: shown beside ours with the difference
energy = chip-hours x W x power_fraction x PUE; tCO2e = MWh x grid; water = IT MWh x on-site
+ MWh x off-site (m3). Every report names the power basis.
examples: minigpt scale gpt3-175b;  minigpt scale patterson-t5 (FLOPs alone);  minigpt scale
llama-65b (GPU-hours);  minigpt scale gpt4-class-moe --set hardware.power_basis=chip;  minigpt
scale epoch-chatgpt-2025 (compute-bound Wh/query);  minigpt scale dense-70b-h100 --set
inference.weight_bits=8;  minigpt scale throughput-dgx-h100;  minigpt scale seed-1-10-wh
(36.5 GWh a year, break-even after 500 days);  shipped scenarios: minigpt/scale/scenarios/*.toml (docs/energy.md)"""


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
