"""Run by tests/test_dist.py under `mpiexec -n N` (and in-process for one rank): train a tiny config
and write, per rank, the loss of every step, the final weights and the meter's rows.

    python tests/mpi_worker.py CONFIG OUT [--resume] [--stop-at STEP --stop-rank R]
    python tests/mpi_worker.py --fail-rank R TRAIN_ARGS...

MINIGPT_BUCKET_BYTES in the environment sets dist.BUCKET_BYTES (with MINIGPT_OVERLAP=1).

--stop-at STEP --stop-rank R: rank R alone asks to stop after STEP (as Ctrl-C would); every rank
must stop after that same step.

--fail-rank R makes rank R raise a DataError in its second step, through the real `train` command,
to show that an error on one rank aborts all of them rather than leaving them waiting.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

from minigpt import cli, config
from minigpt.counting import tables
from minigpt.counting.meter import METER
from minigpt.errors import DataError
from minigpt.train import dist
from minigpt.train.trainer import Trainer


def train(config_path: str, out: Path, resume: bool = False, stop_at: int | None = None,
          stop_rank: int | None = None) -> None:
    """Train; write out/rank<r>.json (losses, meter rows) and out/rank<r>.npy (weights)."""
    cfg = config.load(config_path)
    if "MINIGPT_BUCKET_BYTES" in os.environ:  # the tests' small models: buckets of one block
        dist.BUCKET_BYTES = int(os.environ["MINIGPT_BUCKET_BYTES"])
    METER.reset()
    trainer = Trainer(cfg, resume=resume, progress=False)
    losses, step = [], trainer.train_step

    def recorded_step() -> float:
        loss = step()
        losses.append(loss)
        mine = stop_rank is None or trainer.world.rank == stop_rank
        if stop_at is not None and trainer.state.step == stop_at and mine:
            trainer.request_stop()
        return loss

    trainer.train_step = recorded_step
    trainer.run()
    rank = trainer.world.rank
    rows = tables.rows_from_records(METER.records)
    w = trainer.world
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "size": w.size,
                                                      "local": [w.local_rank, w.local_size],
                                                      "losses": losses, "rows": rows}))
    np.save(out / f"rank{rank}.npy", trainer.model.params.data)


def fail_on(rank: int, argv: list[str]) -> int:
    """The train command, with `rank` failing in its second step."""
    step = Trainer.train_step

    def failing(self) -> float:
        if self.world.rank == rank and self.state.step == 1:
            raise DataError(f"a failure injected on rank {rank}")
        return step(self)

    Trainer.train_step = failing
    return cli.run(cli.cmd_train, argv)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--fail-rank" in args:
        i = args.index("--fail-rank")
        sys.exit(fail_on(int(args[i + 1]), args[:i] + args[i + 2:]))
    stop = {k: int(args[args.index(f"--stop-{k}") + 1]) for k in ("at", "rank")
            if f"--stop-{k}" in args}
    train(args[0], Path(args[1]), resume="--resume" in args, stop_at=stop.get("at"),
          stop_rank=stop.get("rank"))
