"""`minigpt serve RUN`: the OpenAI-compatible server (minigpt.serve) over a trained run."""

import math
import os
from pathlib import Path

from minigpt.cli.common import Parser
from minigpt.cli.generation import apply_int8, int8_arguments
from minigpt.errors import ConfigError


def _serve_parser():
    p = Parser(prog="minigpt serve",
               description="Serve a run over the OpenAI API (/v1/models, /v1/completions, "
               "/v1/chat/completions, streaming), with each request's joules in its usage; "
               "/health and /metrics (Prometheus).",
               epilog="example: minigpt serve out/tiny --port 8000, then "
               "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none')")
    p.add_argument("run", help="a run folder (out/tiny) or a checkpoint file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; any other "
                   "needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together at most, one step for all (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences waiting for a place in the batch at most; beyond, 429 with "
                   "Retry-After (default 64)")
    p.add_argument("--api-key", default=os.environ.get("MINIGPT_API_KEY"),
                   help="require Authorization: Bearer KEY on /v1/* (default $MINIGPT_API_KEY)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients ask for (default: the run folder's name)")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C, let requests in flight finish for this long "
                   "(default 30)")
    p.add_argument("--watts", type=float, default=None,
                   help="the power figure for the joules where no energy counter can be read "
                   "(default: measured where possible, else estimated from the CPU)")
    p.add_argument("--blas-threads", type=int, default=None,
                   help="OpenBLAS threads for the model's steps (default: OpenBLAS's own count); "
                   "on a busy machine 1 is often fastest (minigpt/hardware/blas.py)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run")
    int8_arguments(p)
    return p


def cmd_serve(argv) -> int:
    import minigpt
    from minigpt.serve.app import Server
    from minigpt.serve.energy import StepEnergy
    from minigpt.serve.engine import Engine
    from minigpt.serve.runner import bind, is_loopback, run

    args = _serve_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.blas_threads is not None and args.blas_threads < 1:
        raise ConfigError(f"--blas-threads must be >= 1, got {args.blas_threads}")
    if args.max_queue < 1:
        raise ConfigError(f"--max-queue must be >= 1, got {args.max_queue}")
    if not 0 <= args.drain_seconds < math.inf:
        raise ConfigError(f"--drain-seconds must be >= 0 and finite, got {args.drain_seconds}")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key is empty")
    if not is_loopback(args.host) and args.api_key is None:
        raise ConfigError(f"--host {args.host} listens beyond this machine: give --api-key KEY "
                          f"(or set MINIGPT_API_KEY), or keep the default 127.0.0.1")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"minigpt serve needs the serve extra ({e.name} is not installed): "
                          f"pip install -e \".[serve]\"") from None
    energy = StepEnergy(args.watts)
    model = minigpt.load(args.run, device=args.device)
    apply_int8(model, args)
    model.gpt.prepare_decode()  # float32 weights laid out for the decode kernels (nn/tiled.py)
    name = args.model_name or Path(args.run).resolve().name
    if Path(args.run).is_file():
        name = args.model_name or Path(args.run).resolve().parent.name
    engine = Engine(model.gpt, model.tokenizer, args.max_batch, args.max_queue, energy=energy,
                    blas_threads=args.blas_threads)
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen: "
                          f"{e.strerror or e}") from None
    run(Server(engine, name, args.api_key), sock, args.drain_seconds)
    return 0
