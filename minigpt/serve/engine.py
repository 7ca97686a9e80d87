"""Continuous batching: one thread runs the model; requests join the running batch at the next step.

Each request (a Job) has one sequence (a Slot) per choice, each with its own batch-1 KV cache, so
lengths are ragged. The loop, step after step:

    1. admit waiting slots while the batch has room (--max-batch): prefill their prompts into
       fresh caches, all of them in one step (`prefill_step`, phase "prefill"), and sample each
       one's first token from its prompt's logits; the n choices of one prompt share its
       prefill, each starting from a copy of the cache;
    2. drop the slots whose clients went away (their caches are freed);
    3. one decode step for every running slot at once, `step(model, tokens, caches) -> logits (B, V)`
       (phase "decode"), then sample each slot's next token.

Every step is timed and its joules taken (serve.energy.StepEnergy), the sampling of its tokens
included: a prefill step's are shared by its prompts in proportion to their tokens, and a
prompt's share by its n choices (a copy of the cache is paid by the choice that takes it); a
decode step's equally by the B slots in it. Tokens, text deltas and the end of each
choice go to the job's `sink` (called from this thread; the app hands them to its event loop).

The waiting queue is bounded: a submit that does not fit is refused with 429 and a Retry-After
from the recent pace; once draining (SIGTERM) submits get 503, while what was admitted finishes.
"""

import dataclasses
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from minigpt import backend, kernels
from minigpt.counting.meter import METER
from minigpt.hardware import blas
from minigpt.hardware.counters import SAMPLE_INTERVAL_S
from minigpt.nn.model import KVCache
from minigpt.sampling import sample_next, sequence_rng
from minigpt.serve.energy import StepEnergy
from minigpt.serve.metrics import Metrics
from minigpt.serve.protocol import ApiError, GenerationRequest
from minigpt.serve.text import StopText


def serial_step(model, tokens: list[int], caches: list[KVCache]):
    """The reference decode step: each sequence's next-token logits by its own batch-1 forward.
    (B, V) logits for tokens[i] appended to caches[i]."""
    rows = [model.logits(backend.asarray(np.array([[t]])), kv)[0, -1] for t, kv in zip(tokens, caches)]
    return backend.xp.stack(rows)


def batched_step(model, tokens: list[int], caches: list[KVCache]):
    """One decode step of the whole batch: GPT.decode_step reads every weight once for all B
    sequences, each attending over its own cache."""
    return model.decode_step(backend.asarray(np.array(tokens)), caches)


def default_step(model):
    return batched_step if hasattr(model, "decode_step") else serial_step


def prefill_step(model, prompts: list, caches: list[KVCache]):
    """Each prompt into its own fresh cache: (P, V) logits at each prompt's last position. The
    prompts that arrive together run as one GPT.extend_step, every weight product over all
    their tokens at once: a short prompt's prefill is bound by arithmetic, which more rows a
    product do faster (a 16-token GPT-2 124M prefill on 2 cores: 33-39 ms alone)."""
    if hasattr(model, "extend_step"):
        return model.extend_step([np.asarray(p) for p in prompts], caches)
    rows = [model.logits(backend.asarray(np.array([p])), kv, last_only=True)[0, -1]
            for p, kv in zip(prompts, caches)]
    return backend.xp.stack(rows)


@dataclass
class Usage:
    """A finished request's counts and joules."""

    prompt_tokens: int
    completion_tokens: int
    prefill_joules: float
    decode_joules: float
    basis: str

    def to_json(self) -> dict:
        joules = self.prefill_joules + self.decode_joules
        per = joules / self.completion_tokens if self.completion_tokens else None
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "energy": {"joules": joules, "joules_per_token": per,
                           "prefill_joules": self.prefill_joules,
                           "decode_joules": self.decode_joules, "basis": self.basis}}


@dataclass
class Slot:
    """One sequence of a job: its prompt, cache, new ids, text and joules."""

    job: "Job"
    index: int  # the choice's index in the response
    group: int  # the prompt's index in the request: its n choices share one prefill
    prompt: tuple[int, ...]
    rng: np.random.Generator
    text: StopText
    kv: KVCache | None = None
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prefill_joules: float = 0.0
    decode_joules: float = 0.0


class Job:
    """One request: its slots, where its events go, and whether its client is still there.

    sink(event) receives ("delta", index, text), ("finish", index, reason) and, last,
    ("done", Usage) or ("error", message)."""

    def __init__(self, request: GenerationRequest, tokenizer, sink):
        self.request, self.sink = request, sink
        self.arrived = time.perf_counter()
        self.first_token: float | None = None
        self.cancelled = False
        s = request.sampling
        self.slots = []
        for p, prompt in enumerate(request.prompts):
            for j in range(request.n):
                index = p * request.n + j
                self.slots.append(Slot(self, index, p, prompt, sequence_rng(s.seed, index),
                                       StopText(tokenizer, s.stop)))
        self.open = len(self.slots)
        # prompt index -> (its prefilled cache, the prefill's logits, one choice's share of the
        # prefill's joules, the choices yet to start from it)
        self.prefilled: dict[int, tuple[KVCache, object, float, int]] = {}

    def usage(self, basis: str) -> Usage:
        return Usage(sum(len(p) for p in self.request.prompts),
                     sum(len(s.ids) for s in self.slots),
                     sum(s.prefill_joules for s in self.slots),
                     sum(s.decode_joules for s in self.slots), basis)


class Engine:
    """The model's thread: a bounded queue of slots, the running batch, the step loop."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, step=None,
                 energy: StepEnergy | None = None, metrics: Metrics | None = None,
                 blas_threads: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.blas_threads = blas_threads  # OpenBLAS threads for the steps; None: as it is
        self.max_batch, self.max_queue = max_batch, max_queue
        self.step = step or default_step(model)
        self.energy = energy or StepEnergy()
        self.metrics = metrics or Metrics()
        self.n_tokens = tokenizer.vocab_size  # sample only ids the tokenizer has
        self.kv_int8 = model.quant is not None and model.quant.qcfg.kv_int8
        self.waiting: deque[Slot] = deque()
        self.running: list[Slot] = []
        self.cond = threading.Condition()
        self.draining = False
        self.stopping = False
        self.step_seconds = 0.0  # the last decode step's seconds, the pace Retry-After guesses from
        self.thread = threading.Thread(target=self._loop, name="minigpt-serve-engine", daemon=True)

    # ---- the event loop's side -----------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue's tokens at the recent pace."""
        with self.cond:
            tokens = sum(s.job.request.sampling.max_tokens for s in self.waiting)
        guess = tokens * self.step_seconds / max(1, self.max_batch)  # steps of a full batch
        return max(1, min(60, math.ceil(guess)))

    def submit(self, job: Job) -> None:
        """Queue the job's slots, or raise ApiError: 503 while draining, 429 when full."""
        if len(job.slots) > self.max_queue:
            raise ApiError(400, f"the request asks for {len(job.slots)} sequences (prompts × n); "
                                f"this server queues at most {self.max_queue}", "n")
        with self.cond:
            if self.draining:
                refusal = "draining"
            elif len(self.waiting) + len(job.slots) > self.max_queue:
                refusal = "queue_full"
            else:
                self.waiting.extend(job.slots)
                self.metrics.set("minigpt_queue_depth", len(self.waiting))
                self.cond.notify()
                return
        self.metrics.add("minigpt_refused_total", reason=refusal)
        retry = {"Retry-After": str(self.retry_after())}
        if refusal == "draining":
            raise ApiError(503, "the server is shutting down; retry on another server or later",
                           None, "server_shutting_down", "server_error", retry)
        raise ApiError(429, f"the server is at capacity ({self.max_queue} sequences queued); retry "
                            f"after {retry['Retry-After']} s", None, "queue_full", "rate_limit_error",
                       retry)

    def cancel(self, job: Job) -> None:
        """The client went away: its slots leave the queue now and the batch at the next step."""
        with self.cond:
            job.cancelled = True
            self.waiting = deque(s for s in self.waiting if s.job is not job)
            self.metrics.set("minigpt_queue_depth", len(self.waiting))
            self.cond.notify()

    def drain(self) -> None:
        """Refuse new jobs (503); the admitted ones run to their end."""
        with self.cond:
            self.draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then end the thread (wait up to timeout s)."""
        with self.cond:
            self.draining = self.stopping = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def abort(self) -> None:
        """End every job now, each with an error event, and stop."""
        with self.cond:
            self.draining = self.stopping = True
            jobs = {id(s.job): s.job for s in [*self.waiting, *self.running]}
            for job in jobs.values():
                job.cancelled = True
            self.cond.notify()
        for job in jobs.values():
            job.sink(("error", "the server stopped before this request finished"))

    # ---- the model's thread --------------------------------------------------------------------

    def _loop(self) -> None:
        kernels.fused_threads_here()
        with blas.threads(self.blas_threads or 0):
            self._steps()

    def _steps(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.running and not self.stopping:
                    if not self.cond.wait(SAMPLE_INTERVAL_S):
                        self.energy.keep_counting()
                if self.stopping and not self.waiting and not self.running:
                    return
                admitted = []
                while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                    slot = self.waiting.popleft()
                    if not slot.job.cancelled:
                        admitted.append(slot)
                self.metrics.set("minigpt_queue_depth", len(self.waiting))
            try:
                self._prefill(admitted)
                self.running += [s for s in admitted if s.finish_reason is None]
                self.running = [s for s in self.running if not self._dropped(s)]
                self.metrics.set("minigpt_running_sequences", len(self.running))
                if self.running:
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a fault in a step ends its jobs, not the server
                for slot in [*admitted, *self.running]:
                    if not slot.job.cancelled:
                        slot.job.cancelled = True
                        slot.job.sink(("error", f"generation failed: {type(e).__name__}: {e}"))
                self.running = []

    def _dropped(self, slot: Slot) -> bool:
        if slot.job.cancelled:
            slot.kv = None  # frees the cache
            return True
        return slot.finish_reason is not None

    def _prefill(self, slots: list[Slot]) -> None:
        """Prefill the prompts of `slots` not yet prefilled, together in one step, then start
        every slot: each prompt pays its tokens' share of the step, each of its n choices a 1/n
        share of that and its own step (the copy of the cache it takes, the last taking the
        prefilled cache itself, and the sampling of its first token)."""
        fresh: dict[tuple[int, int], Slot] = {}  # (job, prompt) -> the slot whose prompt it is
        for slot in slots:
            if slot.group not in slot.job.prefilled:
                fresh.setdefault((id(slot.job), slot.group), slot)
        if fresh:
            todo = list(fresh.values())
            caches = []
            for slot in todo:
                # room for the prompt and max_tokens (which the request was checked to fit in
                # the context), not the whole context: a GPT-2 124M cache of 1024 positions is
                # 75 MB
                room = len(slot.prompt) + slot.job.request.sampling.max_tokens
                cfg = dataclasses.replace(self.model.cfg, block_size=room)
                caches.append(KVCache(cfg, 1, self.model.params.data.dtype, int8=self.kv_int8))
            with self.energy.step() as cost, METER.in_phase("prefill"):
                logits = backend.to_host(prefill_step(self.model, [s.prompt for s in todo], caches))
            self.metrics.add("minigpt_joules_total", cost.joules, phase="prefill")
            tokens = sum(len(s.prompt) for s in todo)
            for slot, kv, row in zip(todo, caches, logits):
                n = slot.job.request.n
                share = cost.joules * len(slot.prompt) / tokens
                slot.job.prefilled[slot.group] = (kv, row, share / n, n)
        for slot in slots:
            self._start(slot)

    def _start(self, slot: Slot) -> None:
        """Give the slot its cache (a copy of its prompt's, unless it is the last to start from
        it) and its first token."""
        job = slot.job
        template, logits, share, left = job.prefilled[slot.group]
        with self.energy.step() as own:  # this choice's own part: its cache, its first token
            if left > 1:
                slot.kv = template.copy()
                job.prefilled[slot.group] = (template, logits, share, left - 1)
            else:
                slot.kv = template
                del job.prefilled[slot.group]
            token = self._sample(slot, logits)
        self.metrics.add("minigpt_joules_total", own.joules, phase="prefill")
        slot.prefill_joules += share + own.joules
        self._take(slot, token)

    def _decode(self) -> None:
        batch = self.running
        with self.energy.step() as cost:
            with METER.in_phase("decode"):
                logits = self.step(self.model, [s.ids[-1] for s in batch], [s.kv for s in batch])
                logits = backend.to_host(logits)
            tokens = [self._sample(slot, row) for slot, row in zip(batch, logits)]
        share = cost.joules / len(batch)  # one sequence's share of the step
        self.step_seconds = cost.seconds
        self.metrics.observe("minigpt_batch_size", len(batch))
        self.metrics.add("minigpt_joules_total", cost.joules, phase="decode")
        for slot, token in zip(batch, tokens):
            slot.decode_joules += share
            self._take(slot, token)

    def _sample(self, slot: Slot, logits) -> int:
        s = slot.job.request.sampling
        return sample_next(logits[:self.n_tokens], s.temperature, None, s.top_p, slot.rng)

    def _take(self, slot: Slot, token: int) -> None:
        """Append the slot's next token, send its text, and end the choice when it is done."""
        s = slot.job.request.sampling
        slot.ids.append(token)
        job = slot.job
        if job.first_token is None:
            job.first_token = time.perf_counter()
            self.metrics.observe("minigpt_time_to_first_token_seconds", job.first_token - job.arrived)
        done = len(slot.ids) >= s.max_tokens
        delta, stopped = slot.text.update(slot.ids, final=done)
        if delta:
            job.sink(("delta", slot.index, delta))
        if stopped or done:
            slot.finish_reason = "stop" if stopped else "length"
            job.sink(("finish", slot.index, slot.finish_reason))
            job.open -= 1
            if job.open == 0:
                self._finish(job)

    def _finish(self, job: Job) -> None:
        usage = job.usage(self.energy.basis.value)
        self.metrics.add("minigpt_prompt_tokens_total", usage.prompt_tokens)
        self.metrics.add("minigpt_completion_tokens_total", usage.completion_tokens)
        self.metrics.observe("minigpt_request_latency_seconds", time.perf_counter() - job.arrived)
        job.sink(("done", usage))
