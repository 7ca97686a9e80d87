"""`minigpt serve`: an OpenAI-compatible local server that says what every request cost in joules.

    protocol.py  request bodies -> typed requests, OpenAI error bodies, the chat template
    text.py      a choice's text: stop strings, streamed pieces that add up to the whole
    energy.py    each step's joules (measured, given or estimated, × PUE)
    engine.py    continuous batching on one model thread, the bounded queue
    metrics.py   Prometheus text for /metrics
    app.py       the Starlette routes, SSE streaming, disconnects, the API key
    runner.py    the listening socket, uvicorn, SIGTERM: drain, then exit 0

Starlette and uvicorn come with the `serve` extra (pip install -e ".[serve]").
"""
