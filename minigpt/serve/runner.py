"""Serving an app.Server: bind the socket, print where it listens, run uvicorn until SIGTERM or
Ctrl-C; then stop accepting, let the requests in flight finish (up to drain_seconds, after which
they are ended with an error), and return, so that the command exits 0."""


import signal
import socket
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port); OSError when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections whose socket says TCP, and with it on, uvicorn's response body waited for the
    # client's delayed ACK of the headers: 44 ms on every request after a connection's first
    # (the OpenAI client keeps its connections), against 0.5 ms
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run(server, sock: socket.socket, drain_seconds: float = 30.0, log_level: str = "warning",
        out=sys.stdout) -> None:
    """Serve server (an app.Server) on sock until a signal; the engine drains, then stops."""
    import uvicorn

    from minigpt.serve.app import build_app

    engine = server.engine

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.drain()  # new requests get 503 while the ones in flight finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(build_app(server), log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=drain_seconds, access_log=False)
    # uvicorn raises the signal it stopped on again once it is done, to end the process the
    # signal's usual way; a graceful stop is this command's normal end, so that second signal
    # lands here and is let go.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    engine.start()
    host, port = sock.getsockname()[:2]
    print(f"serving {server.model_name} at http://{host}:{port}/v1 (max batch {engine.max_batch}, "
          f"queue {engine.max_queue}; energy {engine.energy.note})",
          file=out, flush=True)
    try:
        Uvicorn(config).run(sockets=[sock])
    finally:
        engine.stop(timeout=drain_seconds)
        if engine.thread.is_alive():
            engine.abort()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("stopped", file=out, flush=True)
