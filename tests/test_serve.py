"""minigpt serve through the official openai client: models, completions, chat, streaming (the same
text as the whole answer), usage with its energy, continuous batching (concurrent answers equal the
lone ones, batches form, joules shared), the bounded queue (429, 503 with Retry-After), disconnects
freeing their slots, the API key, /metrics. A tiny random model on 127.0.0.1."""

import json
import threading

import httpx
import openai
import pytest
from serve_helpers import MODEL, FixedEnergy, random_model, serve, slowed, wait_until

from minigpt import sampling
from minigpt.counting.meter import METER
from minigpt.serve.engine import Engine, Job, default_step, serial_step
from minigpt.serve.protocol import GenerationRequest, Sampling


@pytest.fixture(scope="module")
def server():
    s = serve(max_batch=8)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=30)


def streamed_text(stream) -> tuple[dict, dict, object]:
    """{index: text}, {index: finish_reason} and the usage of a completions or chat stream."""
    texts, reasons, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            texts[c.index] = texts.get(c.index, "") + (piece or "")
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def energy_of(usage) -> dict:
    return usage.model_extra["energy"]


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model"


def test_completion_usage_counts_tokens_and_energy(client):
    r = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (9, 7, 16)  # bytes
    e = energy_of(u)
    assert e["basis"] in ("measured", "given", "estimated")
    assert e["prefill_joules"] > 0 and e["decode_joules"] > 0
    assert e["joules"] == pytest.approx(e["prefill_joules"] + e["decode_joules"])
    assert e["joules_per_token"] == pytest.approx(e["joules"] / 7)


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 7)])
def test_streamed_text_equals_the_whole_answer(client, temperature, seed):
    args = {"model": MODEL, "prompt": ["The fox", "A crow"], "max_tokens": 12, "temperature": temperature,
                "seed": seed, "n": 2}
    whole = client.completions.create(**args)
    texts, reasons, usage = streamed_text(client.completions.create(
        **args, stream=True, stream_options={"include_usage": True}))
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices} == {i: "length" for i in range(4)}
    assert usage.completion_tokens == whole.usage.completion_tokens == 4 * 12
    assert energy_of(usage)["joules"] > 0


def test_stop_strings_cut_the_text_streamed_or_not(client):
    base = client.completions.create(model=MODEL, prompt="The fox", max_tokens=30, temperature=1,
                                     seed=3).choices[0].text
    stop = base[10:12]
    expected = base[:base.find(stop)]
    args = {"model": MODEL, "prompt": "The fox", "max_tokens": 30, "temperature": 1, "seed": 3, "stop": [stop]}
    whole = client.completions.create(**args)
    texts, reasons, _ = streamed_text(client.completions.create(**args, stream=True))
    assert whole.choices[0].text == texts[0] == expected
    assert whole.choices[0].finish_reason == reasons[0] == "stop"
    assert whole.usage.completion_tokens < 30


def test_a_seeded_choice_samples_as_generate_does(server, client):
    """Choice 0 at seed s draws what minigpt's own generate draws at seed s (the same sampler,
    the same logits): the server adds no sampling of its own."""
    r = client.completions.create(model=MODEL, prompt="The fox", max_tokens=20, temperature=0.8,
                                  top_p=0.9, seed=5)
    tok = server.engine.tokenizer
    gen = sampling.generate(server.engine.model, tok.encode("The fox"), 20, 0.8, None, 0.9, seed=5,
                            n_tokens=tok.vocab_size)
    assert r.choices[0].text == tok.decode(gen.tokens)


@pytest.mark.parametrize("mode, bits", [("w8a32", None), ("w8a8", None), (None, 16), (None, 8),
                                        (None, 4)])
def test_a_quantized_model_serves_what_it_generates(mode, bits):
    """--int8 MODE and --bits B: the batched decode steps run the quantized weights, and the
    answer is the quantized model's own generate at the same seed."""
    if bits is None:
        model = random_model().quantize(mode, kv_int8=mode == "w8a8")
    else:
        model = random_model().quantize(bits=bits, group_size=16)
    s = serve(model)
    try:
        c = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=30)
        r = c.completions.create(model=MODEL, prompt="ab", max_tokens=10, temperature=0.7, seed=2)
    finally:
        s.close()
    gen = model.generation(model.tokenizer.encode("ab"), 10, 0.7, None, None, seed=2)
    assert r.choices[0].text == model.tokenizer.decode(gen.tokens)


def test_seed_repeats_and_choices_differ(client):
    args = {"model": MODEL, "prompt": "x", "max_tokens": 20, "temperature": 1.5, "n": 3, "seed": 11}
    a, b = (client.completions.create(**args) for _ in range(2))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice draws its own tokens


def test_token_id_prompts_and_echo(client):
    by_text = client.completions.create(model=MODEL, prompt="hey", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=[104, 101, 121], max_tokens=5,
                                       temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="hey", max_tokens=5, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "hey" + by_text.choices[0].text


def test_chat_whole_and_streamed(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9,
                                           temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    # the plain template: "system: Be brief.\nuser: Hi\nassistant:" in bytes
    assert whole.usage.prompt_tokens == len("system: Be brief.\nuser: Hi\nassistant:")
    texts, reasons, usage = streamed_text(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=9, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert texts[0] == whole.choices[0].message.content
    assert reasons[0] == whole.choices[0].finish_reason
    assert usage.total_tokens == whole.usage.total_tokens


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "a", "max_tokens": 3, "stream": True}
    r = httpx.post(server.url + "/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_metrics_add_up_to_the_usages(server, client):
    def scrape() -> dict:
        text = httpx.get(server.root + "/metrics", timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    before = scrape()
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, n=2)
    after = scrape()
    grew = lambda k: after[k] - before.get(k, 0.0)
    assert grew("minigpt_completion_tokens_total") == r.usage.completion_tokens == 12
    assert grew("minigpt_prompt_tokens_total") == r.usage.prompt_tokens == 3
    joules = grew('minigpt_joules_total{phase="decode"}') + grew('minigpt_joules_total{phase="prefill"}')
    assert joules == pytest.approx(energy_of(r.usage)["joules"])
    assert grew('minigpt_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert grew("minigpt_request_latency_seconds_count") == 1
    assert 'minigpt_batch_size_bucket{le="+Inf"}' in after


def test_health(server):
    h = httpx.get(server.root + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["model"] == MODEL
    assert h["energy_basis"] in ("measured", "given", "estimated")


# ---------------------------------------------------------------- continuous batching and energy


def test_concurrent_requests_join_one_batch_and_answer_as_alone():
    model = random_model()
    prompts = [f"p{i}: " * (i + 1) for i in range(6)]
    alone = serve(model, step=serial_step)
    try:
        c = openai.OpenAI(base_url=alone.url, api_key="none", max_retries=0, timeout=60)
        expected = [c.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
                    .choices[0].text for p in prompts]
    finally:
        alone.close()
    s = serve(model, max_batch=8, step=slowed(default_step(model.gpt), 0.01))
    try:
        c = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=60)
        got = [None] * len(prompts)

        def ask(i):
            got[i] = c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=16,
                                          temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        hist = s.engine.metrics.hist["minigpt_batch_size"]
    finally:
        s.close()
    assert got == expected
    counts = hist[0]  # cumulative counts at 1, 2, 4, ...
    assert hist[1] > counts[0], "no decode step ever ran more than one sequence"


def test_the_model_thread_runs_the_fused_kernels_on_one_thread(monkeypatch):
    """Numba's thread count is per thread and a new one starts at every core: the engine's
    thread takes the fused kernels' one (kernels.fused_threads_here), or each decode step's
    LayerNorms would wake a second OpenMP thread beside OpenBLAS's."""
    numba = pytest.importorskip("numba")
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: a thread starts at one anyway")
    model = random_model()
    seen = []
    step = default_step(model.gpt)

    def watched(m, tokens, caches):
        seen.append(numba.get_num_threads())
        return step(m, tokens, caches)

    engine = Engine(model.gpt, model.tokenizer, step=watched, energy=FixedEnergy(1.0))
    done = []
    req = GenerationRequest(False, ((1, 2, 3),), ("",), 1, Sampling(3, 0.0, None, (), None), False,
                            False, False)
    engine.submit(Job(req, model.tokenizer, lambda ev: ev[0] == "done" and done.append(ev)))
    engine.start()
    try:
        wait_until(lambda: done, what="the job")
    finally:
        engine.stop(10)
    assert seen and set(seen) == {1}


def test_a_batched_step_shares_its_joules():
    """Two jobs admitted together: their prompts (3 tokens each) share one prefill step by
    their tokens, each decode step's joules are split between the two sequences in it; a later
    lone job pays its steps in full. FixedEnergy: every step the engine times costs 1 J."""
    model = random_model()

    engine = Engine(model.gpt, model.tokenizer, max_batch=4, energy=FixedEnergy(1.0))
    done = {}

    def job(name, max_tokens):
        req = GenerationRequest(False, ((1, 2, 3),), ("",), 1,
                                Sampling(max_tokens, 0.0, None, (), None), False, False, False)
        return Job(req, model.tokenizer, lambda ev: ev[0] == "done" and done.__setitem__(name, ev[1]))

    engine.submit(job("a", 5))
    engine.submit(job("b", 5))
    engine.start()
    try:
        wait_until(lambda: len(done) == 2, what="two jobs")
        engine.submit(job("c", 3))
        wait_until(lambda: len(done) == 3, what="the third job")
    finally:
        engine.stop(10)
    for name in "ab":
        assert done[name].prefill_joules == 1.5  # half the prefill step, its own first sample
        assert done[name].decode_joules == pytest.approx(4 * 0.5)  # 4 steps of 2 sequences
        assert done[name].completion_tokens == 5
    assert done["c"].decode_joules == pytest.approx(2.0)  # 2 steps alone
    assert done["c"].prefill_joules == 2.0  # a prefill step of its own
    assert done["a"].to_json()["energy"]["joules_per_token"] == pytest.approx((1.5 + 2) / 5)


def test_the_choices_of_a_prompt_share_one_prefill():
    """Two prompts of 3 and 2 tokens, n = 3: one prefill step for both (its head one product
    of two rows), each prompt a 3/5 or 2/5 share of it, each choice a 1/3 share of its prompt's
    plus its own step (the cache copy it takes, the last choice taking the prefilled cache
    itself; its first sample)."""
    model = random_model()
    engine = Engine(model.gpt, model.tokenizer, max_batch=4, energy=FixedEnergy(1.0))
    events = []
    req = GenerationRequest(False, ((1, 2, 3), (4, 5)), ("", ""), 3,
                            Sampling(6, 1.0, None, (), 9), False, False, False)
    job = Job(req, model.tokenizer, events.append)
    METER.reset()
    engine.submit(job)
    engine.start()
    try:
        wait_until(lambda: events and events[-1][0] == "done", what="the job")
    finally:
        engine.stop(10)
    heads = [r for k, r in METER.records.items() if k.phase == "prefill" and k.scope == "lm_head"]
    assert [r.calls for r in heads] == [1]  # one step for both prompts, not one per choice
    C, V = model.gpt.cfg.n_embd, model.gpt.cfg.vocab_size
    assert heads[0].flops == 2 * 2 * C * V  # each prompt's last row
    joules = [s.prefill_joules for s in job.slots]
    assert joules == pytest.approx([3 / 5 / 3 + 1] * 3 + [2 / 5 / 3 + 1] * 3)
    assert events[-1][1].prefill_joules == pytest.approx(1 + 6)  # 1 prefill step, 6 own steps
    assert all(len(s.ids) == 6 for s in job.slots) and not job.prefilled
    assert len({tuple(s.ids) for s in job.slots}) > 1


# ------------------------------------------------------------------ load: the queue, disconnects


def test_full_queue_answers_429_and_draining_503_with_retry_after():
    gate = threading.Event()
    model = random_model()
    step = default_step(model.gpt)

    def held(m, tokens, caches):
        gate.wait(30)
        return step(m, tokens, caches)

    s = serve(model, max_batch=1, max_queue=1, step=held)
    try:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 4}
        results = []
        first = threading.Thread(target=lambda: results.append(
            httpx.post(s.url + "/completions", json=body, timeout=30)))
        first.start()
        wait_until(lambda: len(s.engine.running) == 1, what="the first request to run")
        second = threading.Thread(target=lambda: results.append(
            httpx.post(s.url + "/completions", json=body, timeout=30)))
        second.start()
        wait_until(lambda: len(s.engine.waiting) == 1, what="the second request to queue")
        c = openai.OpenAI(base_url=s.url, api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.RateLimitError) as refused:
            c.completions.create(model=MODEL, prompt="b", max_tokens=4)
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert refused.value.body["code"] == "queue_full"
        s.engine.drain()
        r = httpx.post(s.url + "/completions", json=body, timeout=30)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "server_shutting_down"
        gate.set()
        first.join(30)
        second.join(30)
        assert [r.status_code for r in results] == [200, 200]  # nothing admitted was lost
        assert s.engine.metrics.get("minigpt_refused_total", reason="queue_full") == 1
    finally:
        gate.set()
        s.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_frees_its_slot(stream):
    model = random_model()
    s = serve(model, max_batch=2, step=slowed(default_step(model.gpt), 0.02))
    try:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 60, "stream": stream}
        with httpx.Client(timeout=httpx.Timeout(30, read=0.3)) as c:
            if stream:
                with c.stream("POST", s.url + "/completions", json=body) as r:
                    assert next(r.iter_raw()).startswith(b"data: ")  # one event, then it leaves
            else:
                with pytest.raises(httpx.ReadTimeout):  # 60 steps of 20 ms: it gives up first
                    c.post(s.url + "/completions", json=body)
        wait_until(lambda: not s.engine.running and not s.engine.waiting, 10,
                   "the engine to drop the left request")
        assert s.engine.metrics.get("minigpt_completion_tokens_total") == 0  # it never finished
        # the slot is free: a new request runs to its end
        r = httpx.post(s.url + "/completions", json={**body, "max_tokens": 3, "stream": False},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        s.close()


def test_a_queued_client_that_leaves_frees_its_place_in_the_queue():
    gate = threading.Event()
    model = random_model()
    step = default_step(model.gpt)

    def held(m, tokens, caches):
        gate.wait(30)
        return step(m, tokens, caches)

    s = serve(model, max_batch=1, max_queue=1, step=held)
    try:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 3}
        first = threading.Thread(target=lambda: httpx.post(s.url + "/completions", json=body,
                                                           timeout=30))
        first.start()
        wait_until(lambda: len(s.engine.running) == 1, what="the first request to run")
        with pytest.raises(httpx.ReadTimeout):  # queued behind the held step, then gone
            httpx.post(s.url + "/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        wait_until(lambda: not s.engine.waiting, what="the queue to let the left request go")
        gate.set()
        r = httpx.post(s.url + "/completions", json=body, timeout=30)
        assert r.status_code == 200
        first.join(30)
        assert s.engine.metrics.get("minigpt_refused_total", reason="queue_full") == 0
    finally:
        gate.set()
        s.close()


def test_api_key_guards_the_api_not_health():
    s = serve(api_key="sekret")
    try:
        bad = openai.OpenAI(base_url=s.url, api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = httpx.get(s.url + "/models", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=s.url, api_key="sekret", max_retries=0, timeout=30)
        assert good.completions.create(model=MODEL, prompt="a", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(s.root + "/health", timeout=10).status_code == 200
    finally:
        s.close()


def test_the_servers_connections_send_without_waiting_for_acks():
    """runner.bind's socket says TCP, so asyncio (uvicorn's transports) turns Nagle's algorithm
    off on each accepted connection: with it on, a response's body waited for the client's
    delayed ACK of its headers, 44 ms on every request after a connection's first."""
    import asyncio
    import socket

    from minigpt.serve import runner

    sock = runner.bind("127.0.0.1", 0)
    seen = []

    class Accepted(asyncio.Protocol):
        def connection_made(self, transport):
            seen.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def main():
        server = await asyncio.get_running_loop().create_server(Accepted, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        for _ in range(100):  # bounded: the accept runs within a few loop turns
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    asyncio.run(main())
    assert seen and seen[0] != 0
