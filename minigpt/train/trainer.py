"""The training loop: batches -> forward -> backward -> clip -> AdamW, with evaluation, a JSON-lines
log, atomic checkpoints, exact resumption, and a clean stop on Ctrl-C or SIGTERM.

Faults (docs/reliability.md): a memory pre-flight before anything is allocated; one run per
folder (train/runlock.py); every file written through minigpt.safeio; a non-finite loss or
gradient stops the run before the update touches the weights, naming the first layer (in backward
order) whose gradient went non-finite; resuming checks the corpus and tokenizer against the
checkpoint's fingerprints.

Each step runs under the meter's phases (forward, backward, optimizer); evaluation runs under
"eval", so the training phases count training alone. Under `mpiexec -n N` (minigpt.train.dist)
each rank takes its slice of every batch, the gradients and the loss are summed over the ranks
before clipping (phase "communication"), and rank 0 alone evaluates, writes and prints.
"""

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from minigpt import backend, safeio
from minigpt.counting import memory, tables
from minigpt.counting.meter import METER
from minigpt.errors import CheckpointError, ConfigError, MiniGPTError
from minigpt.nn.model import GPT
from minigpt.nn.params import FlatBuffer, init
from minigpt.train import checkpoint, dist, moe_stats
from minigpt.train.data import check_length, get_batch, load_corpus, make_tokenizer, read_splits
from minigpt.train.faults import describe_nonfinite, dict_differences, fingerprint
from minigpt.train.optim import AdamW, clip_grad_norm, lr_at, zero_grad
from minigpt.train.runlock import RunLock


def accumulate(model, batches, n: int, rng=None, ranks: int = 1,
               routings: list | None = None, on_block_done=None) -> float:
    """Zero the gradients, then forward and backward over n micro-batches (an iterable of (x, y)),
    each loss weighted 1 / n, under the meter's forward and backward phases. Returns the mean loss
    (cross-entropy: a MoE model's auxiliary loss is in the gradient, and each micro-batch's routing
    is appended to `routings` when given). With ranks > 1 the gradients are weighted
    1 / (n * ranks), so their sum over the ranks is the global batch's mean gradient (the loss
    returned is still this rank's mean). on_block_done(i) is called as each block's gradients
    become complete in the last micro-batch's backward pass (data parallelism's buckets)."""
    zero_grad(model.grads.data)
    loss = 0.0
    for k, (x, y) in enumerate(batches):
        with METER.in_phase("forward"):
            micro_loss, cache = model.loss(x, y, rng)
        if routings is not None:
            routings.append(model.routing)
        with METER.in_phase("backward"):
            if on_block_done is not None and k == n - 1:
                model.backward(cache, dloss=1.0 / (n * ranks), on_block_done=on_block_done)
            else:  # (a plain call: a wrapped backward without the hook still works)
                model.backward(cache, dloss=1.0 / (n * ranks))
        loss += micro_loss / n
        del cache  # before the next forward: one micro-batch's activations alive, not two
    return loss


def update(model, opt, lr: float, grad_clip: float) -> None:
    """Clip the gradients' global norm (grad_clip > 0) and take one AdamW step (phase optimizer).
    NonFiniteGradient, with the weights untouched, when a gradient is NaN or infinite."""
    with METER.in_phase("optimizer"):
        if grad_clip > 0:
            norm = clip_grad_norm(model.grads.data, grad_clip)
        else:  # no clipping: the same check, unmetered (a guard, not model work)
            norm = float(backend.xp.linalg.norm(model.grads.data))
        if not math.isfinite(norm):
            raise NonFiniteGradient(describe_nonfinite(model))
        opt.step(model.grads.data, lr)


def training_step(model, opt, batches, lr: float, grad_clip: float = 1.0, rng=None) -> float:
    """One optimizer step over a list of micro-batches [(x, y), ...]; returns the mean loss."""
    loss = accumulate(model, batches, len(batches), rng)
    update(model, opt, lr, grad_clip)
    return loss


class TrainingDiverged(MiniGPTError):
    """The loss or a gradient became NaN or infinite; the last good checkpoint is kept."""


class NonFiniteGradient(TrainingDiverged):
    """A gradient is NaN or infinite although the loss is finite; raised before the update."""


@dataclass
class RunState:
    """What a checkpoint carries besides the arrays, so a resumed run continues exactly."""

    step: int = 0
    tokens: int = 0
    counted_tokens: int | None = None  # the tokens rank 0's meter counts cover (its share of them)
    elapsed_s: float = 0.0
    loss_sum: float = 0.0  # training losses since the last evaluation, for the log's train_loss
    loss_count: int = 0
    data_rng: dict = field(default_factory=dict)
    dropout_rng: dict = field(default_factory=dict)
    # mixture of experts (train/moe_stats.py): aux loss since the last log, assignments per expert
    # ({"h0": [n, ...]}) over the whole run and since the last log, capacity drops
    aux_sum: float = 0.0
    expert_load: dict = field(default_factory=dict)
    load_since_log: dict = field(default_factory=dict)
    dropped: int = 0
    dropped_since_log: int = 0


def _header_types(annotation) -> tuple:
    """The JSON types a RunState field of this annotation may hold in a checkpoint's header."""
    return {int: (int,), float: (int, float), dict: (dict,)}.get(annotation, (int, type(None)))


@dataclass
class Result:
    steps: int
    tokens: int
    elapsed_s: float
    val_loss: float
    train_loss: float
    out_dir: str
    interrupted: bool = False
    val_bpb: float = float("nan")  # validation loss in bits per byte of text


class Trainer:
    def __init__(self, cfg, resume: bool = False, progress: bool = True, on_step=None,
                 check_memory: bool = True):
        self.cfg = cfg
        self.on_step = on_step  # called as on_step(trainer) after every step
        self._stop = False  # this rank was asked to stop (Ctrl-C, request_stop)
        self._agreed_stop = False  # some rank was, as of the last allreduce: every rank stops
        self.world = dist.world(cfg.train.device)  # Single unless started by mpiexec -n N > 1
        self.local_batch = dist.local_batch(cfg.train.batch_size, self.world.size)
        self.progress = progress and self.world.rank == 0
        self.stopped_by = ""  # "SIGINT" or "SIGTERM" once a signal asked the run to stop
        backend.use(cfg.train.device)
        backend.keep_freed_memory()
        raw = read_splits(cfg.data)
        self.tokenizer = make_tokenizer(cfg, raw, self.progress)
        self.corpus = load_corpus(cfg.data, self.tokenizer, raw)
        check_length(self.corpus, cfg.model.block_size)
        self.corpus_fingerprint = fingerprint(self.corpus)
        if check_memory and cfg.train.device == "cpu":  # before the parameters are allocated
            memory.preflight(cfg, batch=self.local_batch, processes=self.world.size)
        self.out_dir = cfg.out_dir
        self.ckpt_path = self.out_dir / checkpoint.FILENAME
        self.log_path = self.out_dir / "log.jsonl"

        t = cfg.train
        self.data_rng = np.random.default_rng(t.seed)
        self.dropout_rng = self._dropout_rng()
        val_rng = np.random.default_rng(t.seed + 2)  # fixed validation and train-eval batches
        self.val_batches = [
            get_batch(self.corpus.val, t.batch_size, cfg.model.block_size, val_rng)
            for _ in range(cfg.eval.batches)
        ]
        params = init(cfg.model, np.random.default_rng(t.seed), t.dtype)
        self.model = GPT(cfg.model, params)
        self.model.grads = FlatBuffer(cfg.model, t.dtype)
        # None: the gradients go in one allreduce after the backward pass (dist.OVERLAP says why)
        self.buckets = self.world.buckets(self.model.grads)
        self.opt = AdamW(params, t.beta1, t.beta2, t.eps, t.weight_decay)
        self.state = RunState()
        self.meter_rows = []  # a resumed run's counts so far
        self.eval_seconds: list[float] = []  # wall seconds of this session's evaluations
        self.resumed = resume
        self._log_started = False
        self._resumed_log: list[tuple[str, dict]] = []  # rank 0's log lines, read on resuming
        if resume:
            self._restore()

    # --------------------------------------------------------------------------- checkpoints

    def _restore(self) -> None:
        meta, arrays = checkpoint.load(self.ckpt_path)
        saved = meta.get("config", {})
        now = self.cfg.to_dict()
        if not (isinstance(saved, dict) and all(isinstance(saved.get(s, {}), dict)
                                                for s in ("model", "data"))):
            raise CheckpointError(f"{self.ckpt_path}: corrupt [model]/[data] config in the header")
        for section in ("model", "data"):
            for key, value in saved.get(section, {}).items():
                if now[section].get(key) != value:
                    raise ConfigError(
                        f"--resume: [{section}] {key} = {now[section].get(key)!r} differs from the "
                        f"checkpoint's {value!r} ({self.ckpt_path})"
                    )
        if "adam_m" not in arrays:
            raise CheckpointError(f"{self.ckpt_path}: holds no optimizer state; cannot resume from it")
        self._check_same_data(meta)
        if self.world.rank == 0:
            self._resumed_log = self._read_log()
        dtype = self.model.params.data.dtype
        self.model.params.data[...] = backend.asarray(arrays["params"].astype(dtype))
        self.opt.m[...] = backend.asarray(arrays["adam_m"].astype(dtype))
        self.opt.v[...] = backend.asarray(arrays["adam_v"].astype(dtype))
        try:
            self.state = RunState(**meta["run"])
            for f in dataclasses.fields(RunState):
                value, kinds = getattr(self.state, f.name), _header_types(f.type)
                if not isinstance(value, kinds) or isinstance(value, bool):
                    raise TypeError(f"{f.name} = {str(value)[:30]!r} is not {f.type}")
            tables.records_from_rows(meta.get("meter", []))  # the meter rows, checked here
            self.data_rng.bit_generator.state = self.state.data_rng
            if self.world.rank == 0:
                self.dropout_rng.bit_generator.state = self.state.dropout_rng
        except (KeyError, TypeError, ValueError) as e:  # damaged, or another version's header
            raise CheckpointError(f"{self.ckpt_path}: the run state in its header cannot be "
                                  f"resumed: {str(e)[:100]}") from None
        if self.state.counted_tokens is None:  # a checkpoint from before data parallelism
            self.state.counted_tokens = self.state.tokens
        self.meter_rows = meta.get("meter", [])
        self.opt.t = self.state.step
        if self.world.rank != 0:  # only rank 0's dropout stream is saved: the others restart theirs
            self.dropout_rng = self._dropout_rng(self.state.step)

    def _dropout_rng(self, step: int = 0) -> np.random.Generator:
        """Dropout masks: one process (and rank 0) draws from seed + 1, as always; rank r > 0 from
        its own stream, seeded by (seed + 1, r, the step it starts at), so ranks draw independent
        masks for their different sequences. (With dropout, N ranks therefore train on other masks
        than one process does; with dropout = 0, the default, the runs agree to rounding.)"""
        seed = self.cfg.train.seed + 1
        if self.world.rank == 0:
            return np.random.default_rng(seed)
        return np.random.default_rng([seed, self.world.rank, step])

    def save(self) -> None:
        if self.world.rank != 0:  # rank 0 writes for all: every rank holds the same weights
            return
        self._start_log()
        s = self.state
        s.data_rng = self.data_rng.bit_generator.state
        s.dropout_rng = self.dropout_rng.bit_generator.state
        meta = {
            "config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "corpus": self.corpus_fingerprint,
            "layout": self.model.params.layout,
            "run": s.__dict__,
            "meter": tables.rows_from_records(METER.records),
        }
        arrays = {
            "params": backend.to_host(self.model.params.data),
            "adam_m": backend.to_host(self.opt.m),
            "adam_v": backend.to_host(self.opt.v),
        }
        checkpoint.save(self.ckpt_path, meta, arrays)

    # --------------------------------------------------------------------------- the loop

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss."""
        cfg, t = self.cfg, self.cfg.train
        drop_rng = self.dropout_rng if cfg.model.dropout > 0 else None
        batches = (self._batch() for _ in range(t.grad_accum))  # drawn one at a time, as used
        routings = []
        with np.errstate(over="ignore", invalid="ignore"):  # a diverged loss is reported below
            loss = accumulate(self.model, batches, t.grad_accum, drop_rng, self.world.size, routings,
                              self.buckets.block_done if self.buckets else None)
        loss = self._sum_over_ranks(loss)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} at step {self.state.step + 1} ({describe_nonfinite(self.model)}); "
                f"stopped before the update ({self._kept()}); try a lower [train] learning_rate"
            )
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                update(self.model, self.opt, lr_at(self.state.step, t), t.grad_clip)
        except NonFiniteGradient as e:
            raise NonFiniteGradient(
                f"gradients went non-finite at step {self.state.step + 1} with a finite loss "
                f"{loss:.4f} ({e}); stopped before the update ({self._kept()}); try a lower [train] "
                f"learning_rate or grad_clip"
            ) from None
        moe_stats.add_step(self.state, routings)
        self.state.step += 1
        self.state.tokens += t.grad_accum * t.batch_size * cfg.model.block_size
        self.state.counted_tokens = (self.state.counted_tokens or 0) + (
            t.grad_accum * self.local_batch * cfg.model.block_size)
        return loss

    def _kept(self) -> str:
        return f"{self.ckpt_path} is unchanged" if self.ckpt_path.exists() else "no checkpoint was written"

    def _batch(self):
        """The global batch a single process would draw, and this rank's slice of it."""
        t, T = self.cfg.train, self.cfg.model.block_size
        x, y = get_batch(self.corpus.train, t.batch_size, T, self.data_rng)  # (B, T) each
        if self.world.size > 1:
            mine = slice(self.world.rank * self.local_batch, (self.world.rank + 1) * self.local_batch)
            x, y = x[mine], y[mine]  # (B / N, T)
        return backend.asarray(x), backend.asarray(y)

    def _sum_over_ranks(self, loss: float) -> float:
        """Sum the gradients over the ranks (one allreduce of the flat buffer), then the loss and
        the stop flag (so a Ctrl-C on any rank stops every rank after this same step)."""
        if self.world.size == 1:
            return loss
        if self.buckets is not None:
            self.buckets.finish()
        else:
            self.world.sum_gradients(self.model.grads.data)
        total = self.world.sum_scalars(np.array([loss / self.world.size, float(self._stop)]))
        self._agreed_stop = bool(total[1] > 0)
        self._stop = self._stop or self._agreed_stop
        return float(total[0])

    def _stopping(self) -> bool:
        """One process stops when asked; ranks stop together, when the flag has gone round."""
        return self._agreed_stop if self.world.size > 1 else self._stop

    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches (phase "eval")."""
        losses = []
        t0 = time.perf_counter()
        with METER.in_phase("eval"):
            for x, y in self.val_batches:
                loss, _ = self.model.loss(backend.asarray(x), backend.asarray(y))
                losses.append(loss)
        self.eval_seconds.append(time.perf_counter() - t0)
        return float(np.mean(losses))

    def bits_per_byte(self, loss_nats_per_token: float) -> float:
        """A loss per token as bits per byte of text (the validation split's bytes per token), so
        runs with different tokenizers compare: nats/token x tokens / bytes / ln 2."""
        return loss_nats_per_token / self.corpus.val_bytes_per_token / math.log(2)

    def _log(self, val_loss: float) -> dict:
        if self.world.rank != 0:
            return {}
        self._start_log()
        s = self.state
        entry = {
            "step": s.step,
            "train_loss": s.loss_sum / s.loss_count if s.loss_count else None,
            "val_loss": val_loss,
            "val_bpb": self.bits_per_byte(val_loss),
            "lr": lr_at(max(s.step - 1, 0), self.cfg.train),
            "tokens": s.tokens,
            "elapsed_s": round(s.elapsed_s, 3),
        } | moe_stats.log_fields(s)
        safeio.append_line(self.log_path, json.dumps(entry))
        s.loss_sum, s.loss_count = 0.0, 0
        return entry

    def _start_log(self) -> None:
        """Before the first log line or checkpoint: a fresh run starts a new log; a resumed one
        keeps the lines up to its checkpoint. Until then an earlier run's files stay untouched."""
        if self._log_started:
            return
        self._log_started = True
        keep = [line for line, logged in self._resumed_log if logged["step"] <= self.state.step]
        safeio.write_text(self.log_path, "".join(line + "\n" for line in keep))

    def _read_log(self) -> list[tuple[str, dict]]:
        """The log a resumed run continues: (line, entry) pairs; a damaged line is one error
        (append_line never leaves half a line, so any such line is damage, not a crash)."""
        if not self.log_path.is_file():
            return []
        try:
            text = self.log_path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"--resume: {self.log_path}: unreadable log: {e}") from None
        lines = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                logged = json.loads(line)
            except ValueError:
                logged = None
            if not (isinstance(logged, dict) and isinstance(logged.get("step"), int)):
                raise CheckpointError(f"--resume: {self.log_path} line {number}: not a log entry "
                                      f"({line[:40]!r}); repair or remove that line")
            lines.append((line, logged))
        return lines

    def _logged_at_resume(self) -> dict:
        """The losses to report if no step is left to run: a resumed run's log line at its
        checkpoint's step (NaN where there is none, as before any evaluation)."""
        entry = {"val_loss": float("nan"), "train_loss": float("nan"), "val_bpb": float("nan")}
        for _, logged in self._resumed_log:
            if logged["step"] == self.state.step:
                entry = {k: float(logged.get(k) if logged.get(k) is not None else "nan") for k in entry}
        return entry

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return (what Ctrl-C does)."""
        self._stop = True

    def run(self) -> Result:
        """Train to max_steps (or a stop request), holding the folder's run lock throughout."""
        # rank 0 writes for all ranks, so it alone holds the folder (ranks > 0 never write)
        with RunLock(self.out_dir) if self.world.rank == 0 else contextlib.nullcontext():
            handlers = self._install_signal_handlers()
            try:
                return self._run()
            finally:
                for signum, previous in handlers.items():
                    signal.signal(signum, previous)

    def _install_signal_handlers(self) -> dict:
        """Ctrl-C (when we own the terminal's default handler) and SIGTERM (when nothing else
        handles it): finish the step, save, stop. Returns {signal: previous handler}."""
        installed = {}
        if threading.current_thread() is not threading.main_thread():
            return installed
        wanted = [(signal.SIGINT, signal.default_int_handler)]
        if hasattr(signal, "SIGTERM"):
            wanted.append((signal.SIGTERM, signal.SIG_DFL))
        for signum, default in wanted:
            previous = signal.getsignal(signum)
            if previous is default:
                signal.signal(signum, self._on_signal)
                installed[signum] = previous
        return installed

    def _run(self) -> Result:
        cfg, t = self.cfg, self.cfg.train
        METER.records = tables.records_from_rows(self.meter_rows)  # the whole run's counts
        tokens_per_step = t.grad_accum * t.batch_size * cfg.model.block_size
        entry = self._logged_at_resume()
        self._save_tokenizer()
        bar = tqdm(total=t.max_steps, initial=self.state.step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            while self.state.step < t.max_steps and not self._stopping():
                t0 = time.perf_counter()
                loss = self.train_step()
                dt = time.perf_counter() - t0
                self.state.elapsed_s += dt
                self.state.loss_sum += loss
                self.state.loss_count += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
                at_eval = self.state.step % cfg.eval.interval == 0 or self.state.step == t.max_steps
                if at_eval and self.world.rank == 0:  # the others go on to the next allreduce
                    entry = self._log(self.evaluate())
                    bar.write(f"step {entry['step']:5d}  train {entry['train_loss']:.4f}  "
                              f"val {entry['val_loss']:.4f}  lr {entry['lr']:.2e}")
                    self.save()
                if self.on_step is not None:
                    self.on_step(self)
            if self._stop:
                self.save()
            if self.world.rank == 0:
                tables.save(self.out_dir, tables.rows_from_records(METER.records), self.state.step,
                            self.state.counted_tokens or 0, ranks=self.world.size)
        finally:
            bar.close()
        s = self.state
        return Result(s.step, s.tokens, s.elapsed_s, entry["val_loss"], entry["train_loss"],
                      str(self.out_dir), interrupted=self._stop, val_bpb=entry["val_bpb"])

    def _save_tokenizer(self) -> None:
        """A BPE run's vocab.json + merges.txt beside its checkpoint (the checkpoint's meta holds
        them too, so generate needs nothing else)."""
        if self.tokenizer.kind == "bpe" and self.world.rank == 0:
            self.tokenizer.save(self.out_dir)

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self._stop:  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._stop = True
        self.stopped_by = name
        what = "Ctrl-C" if name == "SIGINT" else name
        tqdm.write(f"{what}: finishing this step and saving a checkpoint ({what} again to abort)",
                   file=sys.stderr)

    # --------------------------------------------------------------------------- same data

    def _check_same_data(self, meta: dict) -> None:
        """Resuming: the corpus and tokenizer must be the ones the checkpoint was trained on."""
        where = f"--resume ({self.ckpt_path})"
        saved_tok, now_tok = meta.get("tokenizer"), self.tokenizer.to_dict()
        if saved_tok is not None and saved_tok != now_tok:
            raise ConfigError(f"{where}: the tokenizer differs from the checkpoint's: "
                              f"{'; '.join(dict_differences(saved_tok, now_tok))}")
        saved = meta.get("corpus")
        if saved is None:
            print(f"note: {self.ckpt_path} predates corpus fingerprints; the corpus is not checked",
                  file=sys.stderr)
            return
        if not isinstance(saved, dict):
            raise CheckpointError(f"{self.ckpt_path}: corrupt corpus fingerprint in the header")
        now = self.corpus_fingerprint
        differs = [k for k in ("train_tokens", "val_tokens", "sha256") if saved.get(k) != now.get(k)]
        if differs:
            diffs = "; ".join(f"{k}: checkpoint {str(saved.get(k))[:16]}, now {str(now.get(k))[:16]}"
                              for k in differs)
            raise ConfigError(f"{where}: the corpus differs from the one the checkpoint was trained on "
                              f"({diffs}; checkpoint read {saved.get('source')}, now "
                              f"{now['source']}); resume with the same [data], or start a new run")
