"""`minigpt train` (train.py): a run from a config, alone or on MPI ranks, and its end-of-run
report: the cost per layer, the energy in four layers, energy.json, the GPT-3 line, report.html."""

import argparse
import math
import sys
from typing import NamedTuple

from minigpt.cli.common import EXIT_BAD_INPUT, Parser
from minigpt.errors import MiniGPTError


def _train_parser(prog="minigpt train") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Train a GPT-2 from scratch on a corpus. Writes <out_dir>/log.jsonl (one line per "
        "evaluation) and <out_dir>/ckpt.npz (everything needed to resume or generate), then the "
        "costs (costs.json, costs.csv), the run's energy (energy.json) and report.html.",
        epilog="example: python train.py configs/tiny.toml --set train.max_steps=100.  On MPI: "
        "mpiexec -n 2 python train.py configs/tiny.toml; each rank gets this node's cores / the "
        "ranks on it as BLAS and Numba threads (MINIGPT_THREADS=n chooses n; MINIGPT_OVERLAP=1 sums "
        "the gradients in buckets during the backward pass).",
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
    energy_arguments(p)
    return p


def _watts(text: str) -> float:
    """--watts: a positive, finite number of watts (argparse turns a ValueError into one line)."""
    w = float(text)
    if not (math.isfinite(w) and w > 0):
        raise ValueError(text)
    return w


_watts.__name__ = "watts (a positive number)"  # what argparse names in its error line


def energy_arguments(p) -> None:
    p.add_argument("--watts", type=_watts, default=None,
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
    _set_threads()
    cfg = config.load(args.config, args.overrides)
    return args, Trainer(cfg, resume=args.resume, progress=not args.no_progress,
                         check_memory=not args.skip_memory_check)


def _set_threads() -> None:
    """Threads per process for the BLAS and Numba before either computes anything: the cores of
    this node shared among the ranks on it (minigpt.hardware.blas.plan). Rank 0 prints the choice
    and its reason where there is one to make (several ranks, a thread variable set, or more
    threads than cores); a plain run with nothing set keeps the libraries' own default."""
    from minigpt.hardware import blas
    from minigpt.train import dist

    w = dist.world()
    plan = blas.plan(w.local_size)
    if w.local_size == 1 and plan.automatic:
        return
    blas.apply(plan)
    if w.rank == 0:
        print(plan.line(), file=sys.stderr)


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
    from minigpt.hardware import counters
    from minigpt.train import throughput

    start_step = trainer.state.step
    start_tokens, start_s = trainer.state.tokens, trainer.state.elapsed_s  # > 0 when resumed
    prediction = _predict_run(trainer, args)
    with counters.measure() as measured:
        result = trainer.run()
    session = _Session(result.steps - start_step, result.tokens - start_tokens,
                       result.elapsed_s - start_s)
    if result.interrupted:
        import shlex

        again = " ".join(shlex.quote(a) for a in [str(args.config), *(
            x for o in args.overrides for x in ("--set", o))])
        print(f"stopped at step {result.steps}; checkpoint saved to {trainer.ckpt_path}. Continue "
              f"with: python train.py {again} --resume", file=sys.stderr)
        return 143 if trainer.stopped_by == "SIGTERM" else 130
    print(f"done: {result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.1f} s; "
          f"val loss {result.val_loss:.4f} nats/token ({result.val_bpb:.4f} bits/byte); checkpoint {trainer.ckpt_path}")
    if trainer.world.size == 1:  # one process's speed, for a data-parallel run's comparison
        throughput.remember(trainer.cfg, session.tokens, session.seconds, session.steps)
    _print_training_costs(trainer, result, measured, args, start_tokens, prediction, session)
    return 0


def _predict_run(trainer, args):
    """Print the forecast of the steps left (CPU runs): "prediction: about 2 min 25 s and 1.2 kJ
    here (...)"; returns the Forecast, or None (a GPU run: the time model is the CPU's)."""
    from minigpt.energy import accounting, forecast
    from minigpt.train import timing_runs

    cfg = trainer.cfg
    left = cfg.train.max_steps - trainer.state.step
    if cfg.train.device != "cpu" or left < 1 or trainer.world.size > 1:
        return None
    prof, _ = accounting.find_profile(hardware_for(args, "cpu"))
    f = forecast.forecast(cfg, timing_runs.time_model(), "train", left, profile=prof,
                          watts=args.watts)
    print(f"prediction: {forecast.headline(f)}", file=sys.stderr)
    if f.suspect:
        print(f"note: the time model was {f.suspect}", file=sys.stderr)
    return f


class _Session(NamedTuple):
    """What this invocation trained (a resumed run's earlier sessions excluded): all ranks' tokens
    over rank 0's summed step time."""

    steps: int
    tokens: int
    seconds: float


def _data_parallel_lines(trainer, counted: int, everyone: int, session: _Session) -> list[str]:
    """Whose numbers the table shows, and the job's tokens/s beside one process's for this config
    on this machine where one was recorded (minigpt.train.throughput)."""
    from minigpt.train import throughput

    ranks = trainer.world.size
    lines = [(f"data parallel over {ranks} MPI ranks: the table above is rank 0's share, not the "
              f"job's: its {counted:,} of the {everyone:,} tokens, its FLOPs and bytes, its seconds "
              f"(each rank did the same work)")]
    if session.seconds <= 0 or session.steps <= 0:
        return lines
    job = session.tokens / session.seconds
    text = (f"the whole job: {job:,.0f} tokens/s ({session.tokens:,} tokens over {ranks} ranks in "
            f"rank 0's {session.seconds:.1f} s of steps)")
    one = throughput.recall(trainer.cfg)
    if one is not None:
        text += (f"; one process: {one['tokens_per_s']:,.0f} tokens/s for this config on this "
                 f"machine ({one['steps']} steps, {one['when']}), so {job / one['tokens_per_s']:.2f}x")
    else:
        text += ("; one process's figure for this config is not known here yet (a plain `python "
                 f"train.py` run of {throughput.MIN_STEPS} steps or more records it)")
    return lines + [text]


def hardware_for(args, device: str):
    return args.hardware or ("local-cpu" if device == "cpu" else None)


def _print_training_costs(trainer, result, measured, args, start_tokens: int = 0,
                          prediction=None, session: "_Session | None" = None) -> None:
    from minigpt.counting import tables
    from minigpt.counting.meter import METER
    from minigpt.energy import forecast, run_energy
    from minigpt.hardware import calibrate
    from minigpt.report import html
    from minigpt.runs import session_rows
    from minigpt.scale import projection

    on_cpu = trainer.cfg.train.device == "cpu"
    rows = tables.rows_from_records(METER.records)
    notes = calibrate.check_run(rows).notes if on_cpu else []  # a figure the run beat is replaced
    peak, where = calibrate.local_peak() if on_cpu else (None, "")
    if on_cpu and calibrate.QUICK_NOTE in where and (note := calibrate.suspect_note()):
        notes.append(f"note: {note}")
    ranks, everyone = trainer.world.size, result.tokens
    if ranks > 1:  # the counts are rank 0's: its share of the tokens goes with them
        result.tokens = trainer.state.counted_tokens
    print()
    print(tables.summary(rows, result.steps, result.tokens, peak, where))
    for note in notes:
        print(note)
    if ranks > 1:
        session = session or _Session(result.steps, everyone, result.elapsed_s)
        print("\n".join(_data_parallel_lines(trainer, result.tokens, everyone, session)))
    print(f"details: minigpt costs {trainer.out_dir} --by op  (also {trainer.out_dir}/costs.json, costs.csv)")
    _print_fusion(trainer, result)
    print()
    # this session's energy: a resumed run's earlier sessions were reported when they ran
    this_session = session_rows(rows, trainer.meter_rows)
    hw = hardware_for(args, trainer.cfg.train.device)
    tokens = (everyone - start_tokens) // ranks  # this session's tokens (rank 0's share of them)
    doc = run_energy.build(this_session, measured.seconds, hw, measured, args.watts, tokens,
                           estimate=on_cpu)
    print("\n".join(run_energy.report_lines(doc)))  # the table, from what energy.json holds
    steps, step_s = (session.steps, session.seconds) if session else (0, 0.0)
    if prediction is not None and steps > 0:
        evals = trainer.eval_seconds
        joules, basis = _reported_joules(doc)
        doc["prediction"] = forecast.against(prediction, step_s / steps,
                                             sum(evals) / len(evals) if evals else 0.0,
                                             measured.seconds, joules, basis)
        print("\n".join(forecast.comparison_lines(doc["prediction"])))
    print(f"wrote {run_energy.save(trainer.out_dir, doc)}")
    print(projection.gpt3_projection_line(result.tokens, rows, joules=measured.total_joules))
    print(f"report: {html.write(trainer.out_dir)}  (open it in a browser)")
    _print_moe_summary(trainer, result)


def _reported_joules(doc: dict) -> tuple[float | None, str]:
    """The run's energy to hold a prediction against: measured where read, else time x power."""
    for key, name in (("measured", "measured"), ("time_x_power", "time x power")):
        if doc["layers"][key]["joules"] is not None:
            return doc["layers"][key]["joules"], name
    return None, ""


def _print_fusion(trainer, result) -> None:
    """What the fused kernels saved this run (bytes, and an estimate of seconds), written to
    fusion.json for report.html; nothing on NumPy's path."""
    import numpy as np

    from minigpt import backend
    from minigpt.train import fusion
    from minigpt.train.data import get_batch

    t = trainer.cfg.train
    x, y = get_batch(trainer.corpus.train, trainer.local_batch, trainer.cfg.model.block_size,
                     np.random.default_rng(0))  # a fixed batch: the run's data stream is untouched
    doc = fusion.compare(trainer.model, backend.asarray(x), backend.asarray(y), result.steps,
                         t.grad_accum, t.dtype)
    if doc is not None:
        print("\n".join(fusion.lines(doc)))
        fusion.save(trainer.out_dir, doc)


def _print_moe_summary(trainer, result) -> None:
    """A MoE run's parameters, FLOPs per token and expert load (nothing for a dense model)."""
    from minigpt.counting.meter import METER
    from minigpt.train import moe_stats

    lines = moe_stats.summary_lines(trainer.cfg, trainer.state, METER.records, result.tokens)
    if lines:
        print()
        print("\n".join(lines))
