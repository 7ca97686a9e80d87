"""minigpt serve under bad input and at its end: malformed JSON, wrong types, out-of-range values,
unknown models and routes, oversized bodies and over-long prompts get a 4xx with an OpenAI error
body (hypothesis over request bodies: never a 500); the command refuses bad options in one line
(exit 2); SIGTERM on a real server lets the request in flight finish and exits 0."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from conftest import ROOT, TINY_TOML, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import MODEL, SMALL, serve


@pytest.fixture(scope="module")
def server():
    s = serve(max_batch=4, max_body_bytes=4096)
    yield s
    s.close()


def post(server, body, path="/completions", raw: bytes | None = None, **headers) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=30,
                      headers={"content-type": "application/json", **headers})


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None,
                        param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err


OK = {"model": MODEL, "prompt": "hello", "max_tokens": 2}


@pytest.mark.parametrize("change, status, code, param", [
    ({"model": "gpt-4"}, 404, "model_not_found", "model"),
    ({"model": None}, 400, None, "model"),
    ({"max_tokens": -1}, 400, "invalid_value", "max_tokens"),
    ({"max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"max_tokens": "5"}, 400, "invalid_type", "max_tokens"),
    ({"max_tokens": True}, 400, "invalid_type", "max_tokens"),
    ({"max_tokens": 2.5}, 400, "invalid_type", "max_tokens"),
    ({"temperature": -0.1}, 400, "invalid_value", "temperature"),
    ({"temperature": 2.5}, 400, "invalid_value", "temperature"),
    ({"temperature": "hot"}, 400, "invalid_type", "temperature"),
    ({"top_p": 0}, 400, "invalid_value", "top_p"),
    ({"top_p": 1.5}, 400, "invalid_value", "top_p"),
    ({"n": 0}, 400, "invalid_value", "n"),
    ({"n": 1000}, 400, "invalid_value", "n"),
    ({"seed": -3}, 400, "invalid_value", "seed"),
    ({"stop": 5}, 400, "invalid_type", "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
    ({"stop": [""]}, 400, "invalid_value", "stop"),
    ({"stream": "yes"}, 400, "invalid_type", "stream"),
    ({"echo": 1}, 400, "invalid_type", "echo"),
    ({"prompt": ""}, 400, "invalid_value", "prompt"),
    ({"prompt": []}, 400, "invalid_type", "prompt"),
    ({"prompt": [1, "a"]}, 400, "invalid_type", "prompt"),
    ({"prompt": [300]}, 400, "invalid_value", "prompt"),
    ({"prompt": [[1, 2], [-1]]}, 400, "invalid_value", "prompt"),
    ({"prompt": None}, 400, "missing_required_parameter", "prompt"),
    ({"logprobs": 3}, 400, "unsupported_value", "logprobs"),
    ({"frobnicate": 1}, 400, "unrecognized_argument", "frobnicate"),
    ({"stream_options": {"include_usage": True}}, 400, "invalid_value", "stream_options"),
    ({"max_tokens": SMALL["block_size"]}, 400, "context_length_exceeded", "prompt"),
    ({"prompt": "x" * 60, "max_tokens": 5}, 400, "context_length_exceeded", "prompt"),
])
def test_bad_completion_fields_get_a_400_naming_the_field(server, change, status, code, param):
    assert_openai_error(post(server, {**OK, **change}), status, code, param)


@pytest.mark.parametrize("messages, param", [
    (None, "messages"), ([], "messages"), ("hi", "messages"), ([{"role": "user"}], "messages[0].content"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role"), ([3], "messages[0]"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
])
def test_bad_chat_messages_get_a_400(server, messages, param):
    body = {"model": MODEL, "messages": messages, "max_tokens": 2}
    assert_openai_error(post(server, body, "/chat/completions"), 400, param=param)


def test_chat_without_max_tokens_fills_the_context(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    r = post(server, body, "/chat/completions")
    assert r.status_code == 200
    u = r.json()["usage"]
    assert u["total_tokens"] <= SMALL["block_size"]


@pytest.mark.parametrize("raw", [b"{", b"", b"\xff\xfe", b"[1, 2", b"nan", b"[" * 100_000])
def test_malformed_json_gets_a_400(server, raw):
    assert_openai_error(post(server, None, raw=raw[:4096]), 400)


@pytest.mark.parametrize("body", [[], "a string", 3, None, [OK]])
def test_a_body_that_is_not_an_object_gets_a_400(server, body):
    assert_openai_error(post(server, body), 400, "invalid_type")


def test_an_oversized_body_gets_a_413(server):
    assert_openai_error(post(server, {**OK, "prompt": "x" * 10_000}), 413, "request_too_large")
    chunks = (b"x" * 1024 for _ in range(10))  # no Content-Length: counted as it arrives
    r = httpx.post(server.url + "/completions", content=chunks, timeout=30)
    assert_openai_error(r, 413, "request_too_large")


def test_unknown_routes_and_methods_get_openai_errors(server):
    assert_openai_error(httpx.get(server.url + "/engines", timeout=10), 404, "not_found")
    assert_openai_error(httpx.get(server.url + "/completions", timeout=10), 405,
                        "method_not_allowed")


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
          "stream", "echo", "stream_options", "logprobs", "user", "max_completion_tokens"]
# plausible values beside arbitrary JSON, so that bodies get past the first checks too
PLAUSIBLE = {"model": st.just(MODEL), "prompt": st.text(max_size=8) | st.lists(st.integers(0, 300), max_size=4),
             "max_tokens": st.integers(-2, 70), "temperature": st.floats(-1, 3),
             "top_p": st.floats(-0.5, 1.5), "n": st.integers(-1, 3), "stream": st.booleans(),
             "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "x"]),
                                                         "content": st.text(max_size=6)}), max_size=2)}
BODIES = st.one_of(JSON, st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6),
                   st.fixed_dictionaries({}, optional={k: PLAUSIBLE.get(k, JSON) for k in FIELDS}))


@settings(max_examples=2 * int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None,
          database=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES, chat=st.booleans())
def test_no_request_body_gets_a_500(server, body, chat):
    try:
        raw = json.dumps(body, allow_nan=True).encode()
    except (ValueError, OverflowError):
        return
    r = post(server, None, "/chat/completions" if chat else "/completions", raw=raw[:4096])
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert_openai_error(r, r.status_code)
    else:
        assert r.headers["content-type"].startswith(("application/json", "text/event-stream"))


# --------------------------------------------------------------------------- the command itself


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-run") / "run"
    sets = [a for k, v in {**SMALL, "block_size": 256}.items() for a in ("--set", f"model.{k}={v}")]
    r = run_cli("-m", "minigpt", "init", TINY_TOML, out, *sets, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("args, says", [
    (["--host", "0.0.0.0"], "--api-key"),
    (["--max-batch", "0"], "--max-batch"),
    (["--port", "70000"], "--port"),
    (["--watts", "-5"], "--watts"),
    (["--api-key", " "], "--api-key"),
])
def test_bad_options_are_one_line_and_exit_2(run_dir, args, says):
    r = run_cli("-m", "minigpt", "serve", run_dir, *args)
    assert r.returncode == 2 and says in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_missing_run_is_one_line_and_exit_2(tmp_path):
    r = run_cli("-m", "minigpt", "serve", tmp_path / "nothing")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sigterm_finishes_the_request_in_flight_and_exits_0(run_dir):
    proc = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", str(run_dir), "--port", "0",
                             "--max-batch", "2"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving run at http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        body = {"model": "run", "prompt": "a", "max_tokens": 200, "n": 6, "stream": True}
        events = []
        with httpx.stream("POST", url + "/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            events.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            refused = None
            try:  # a new request while draining: refused or not connected at all
                refused = httpx.post(url + "/completions", json={**body, "stream": False},
                                     timeout=10).status_code
            except httpx.TransportError:
                pass
            events += [e for e in lines if e]
        assert refused in (None, 503)
        code = proc.wait(timeout=60)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, err
    assert events[-1] == "data: [DONE]"
    ends = [json.loads(e[6:])["choices"][0] for e in events[:-1]]
    assert sorted(c["index"] for c in ends if c["finish_reason"] == "length") == list(range(6))
    assert "stopped" in out and "Traceback" not in err
