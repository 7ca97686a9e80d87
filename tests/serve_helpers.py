"""Shared by the server's tests: a tiny random model, and a server on 127.0.0.1 (an ephemeral port)
run by uvicorn in a thread of the test process, with the engine's step and energy swappable."""

import threading
import time
from contextlib import contextmanager

import uvicorn

from minigpt import config
from minigpt.api import Model
from minigpt.serve.app import Server, build_app
from minigpt.serve.energy import StepCost, StepEnergy
from minigpt.serve.engine import Engine
from minigpt.serve.runner import bind

SMALL = {"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 64}
MODEL = "tiny-serve"


def random_model(seed: int = 0, **model) -> Model:
    cfg = config.load(None, [f"model.{k}={v}" for k, v in {**SMALL, **model}.items()])
    return Model.from_config(cfg, seed=seed)


class FixedEnergy(StepEnergy):
    """Every step costs `joules` exactly: the arithmetic of the shares can be checked."""

    def __init__(self, joules: float = 1.0):
        super().__init__(watts=1.0, readers=[])
        self.joules = joules

    @contextmanager
    def step(self):
        cost = StepCost()
        yield cost
        cost.seconds, cost.joules = 1.0, self.joules


def slowed(step, seconds: float):
    """A decode step that takes at least `seconds` (so that requests overlap in a test)."""

    def slow(model, tokens, caches):
        time.sleep(seconds)
        return step(model, tokens, caches)

    return slow


class Running:
    """A served engine: .url is the API's base URL; close() stops it."""

    def __init__(self, engine: Engine, api_key: str | None = None, max_body_bytes: int = 1 << 20):
        self.engine = engine
        self.server = Server(engine, MODEL, api_key, max_body_bytes)
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.root = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(build_app(self.server), log_level="critical", lifespan="off",
                             timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(cfg)
        engine.start()
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "the server did not start within 20 s"
            time.sleep(0.01)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)
        self.engine.stop(10)
        if self.engine.thread.is_alive():
            self.engine.abort()


def serve(model: Model | None = None, api_key: str | None = None, max_body_bytes: int = 1 << 20,
          **engine_args) -> Running:
    model = model or random_model()
    return Running(Engine(model.gpt, model.tokenizer, **engine_args), api_key, max_body_bytes)


def wait_until(condition, seconds: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.01)
