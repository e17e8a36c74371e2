"""`balcony serve`: a real server on 127.0.0.1 and the `openai` client against it (a tiny model)."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package is built on
import openai
import pytest
import uvicorn
import balcony_ext as bx
from balcony_ext.batcher import Batcher
from balcony_ext.budgets import choose_exit
from balcony_ext.model import attach
from tiny_models import tiny_chat_balcony


L = 6
EXITS = [2, 4]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, **batcher_kw):
        from balcony_ext.server import create_app

        self.batcher = Batcher(model, calibration=None, **batcher_kw)
        self.app = create_app(model, self.batcher)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.time() + 30
        while not self.server.started:
            assert time.time() < end, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def close(self):
        self.server.should_exit = True  # what uvicorn's SIGTERM handler does
        self.thread.join(30)


@pytest.fixture(scope="module")
def model():
    m = tiny_chat_balcony(seed=0, layers=L, initializer_range=0.2)
    attach(m, EXITS, init="random", seed=1)
    return m


@pytest.fixture(scope="module")
def server(model):
    s = Server(model, max_batch=4, max_len=128)
    yield s
    s.close()


def _alone(model, prompt, chat, **kw):
    return bx.generate(model, prompt, chat=chat, calibration=None, **kw)


def test_completion_and_chat_completion(server, model):
    c = server.client
    r = c.completions.create(model=model.name, prompt="Hello there", max_tokens=8, temperature=0,
                             extra_body={"budget": 0.6, "full_start": 0})  # (every token at the budget's route)
    k, _ = choose_exit(model, 0.6)
    alone = _alone(model, "Hello there", False, budget=0.6, max_new_tokens=8, full_start=0)
    assert r.choices[0].text == alone.text
    assert r.model_extra["exit_layers"] == alone.exit_layers == [k] * len(alone.tokens)
    assert r.model_extra["heads"] == alone.heads == [0] * len(alone.tokens)  # (no shortlist: the full head)
    with pytest.raises(openai.BadRequestError, match="no vocabulary shortlist"):
        c.completions.create(model=model.name, prompt="Hello", max_tokens=2, extra_body={"shortlist": True})
    assert r.usage.completion_tokens == len(alone.tokens) and r.usage.prompt_tokens == 11
    assert r.choices[0].finish_reason == alone.finish_reason

    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    r = c.chat.completions.create(model=model.name, messages=msgs, max_tokens=12, temperature=0,
                                  extra_body={"exit_layer": 2})
    alone = _alone(model, "Why is the sky blue?", True, exit_layer=2, max_new_tokens=12)
    assert r.choices[0].message.content == alone.text and r.choices[0].message.role == "assistant"
    assert r.model_extra["exits"] == {"2": len(alone.tokens)}
    assert c.models.list().data[0].id == model.name
    # confidence: the tokens exit 2 is unsure of are taken again at the full depth
    for conf in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5):  # a threshold that takes some tokens at the exit, not all
        alone = _alone(model, "Why is the sky blue?", True, exit_layer=2, confidence=conf, max_new_tokens=12)
        if set(alone.exit_layers) == {2, L}:
            break
    assert set(alone.exit_layers) == {2, L}
    r = c.chat.completions.create(model=model.name, messages=msgs, max_tokens=12, temperature=0,
                                  extra_body={"exit_layer": 2, "confidence": conf})
    assert r.choices[0].message.content == alone.text and r.model_extra["exit_layers"] == alone.exit_layers
    # full_start: the opening at the full depth, the request's exit after it
    alone = _alone(model, "Why is the sky blue?", True, exit_layer=2, full_start=5, max_new_tokens=12)
    r = c.chat.completions.create(model=model.name, messages=msgs, max_tokens=12, temperature=0,
                                  extra_body={"exit_layer": 2, "full_start": 5})
    assert r.choices[0].message.content == alone.text and r.model_extra["exit_layers"] == alone.exit_layers
    assert alone.exit_layers[:5] == [L] * 5 and set(alone.exit_layers[5:]) == {2}
    # full_start "auto": the budget spends an opening over max_tokens where it fits
    alone = _alone(model, "Why is the sky blue?", True, budget=0.9, full_start="auto", max_new_tokens=12)
    r = c.chat.completions.create(model=model.name, messages=msgs, max_tokens=12, temperature=0,
                                  extra_body={"budget": 0.9, "full_start": "auto"})
    assert r.choices[0].message.content == alone.text and r.model_extra["exit_layers"] == alone.exit_layers
    assert 0 < alone.full_start < len(alone.tokens) and alone.exit_layers[:alone.full_start] == [L] * alone.full_start


def test_streaming(server, model):
    c = server.client
    pieces, exits = [], []
    for chunk in c.completions.create(model=model.name, prompt="Stream me", max_tokens=10, temperature=0,
                                      stream=True, extra_body={"budget": 1.0}):
        pieces.append(chunk.choices[0].text)
        if chunk.model_extra.get("exit_layer") is not None:
            exits.append(chunk.model_extra["exit_layer"])
        last = chunk
    alone = _alone(model, "Stream me", False, max_new_tokens=10)
    assert "".join(pieces) == alone.text and last.choices[0].finish_reason == alone.finish_reason
    assert set(exits) == {L}
    chunks = list(c.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    alone = _alone(model, "Hi", True, max_new_tokens=6)
    assert text == alone.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == len(alone.tokens)


def test_concurrent_clients_equal_each_request_alone(server, model):
    # 16 clients, different budgets, prompts, lengths and arrival times, on 4 cache rows
    budgets = [1.0, 0.3, {"exit_layer": 4}, 0.6]
    jobs = []
    for i in range(16):
        b = budgets[i % 4]
        extra = b if isinstance(b, dict) else {"budget": b}
        jobs.append((f"Question number {i}: " + "why " * (i % 5), 5 + (3 * i) % 11, extra, 0.02 * (i % 7)))

    def call(job):
        prompt, n, extra, delay = job
        time.sleep(delay)
        r = server.client.completions.create(model=model.name, prompt=prompt, max_tokens=n, temperature=0,
                                             extra_body=extra)
        return r.choices[0].text, r.model_extra["exit_layers"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, jobs))
    for (prompt, n, extra, _), (text, exit_layers) in zip(jobs, results):
        kw = {"exit_layer": extra["exit_layer"]} if "exit_layer" in extra else {"budget": extra["budget"]}
        alone = _alone(model, prompt, False, max_new_tokens=n, **kw)
        assert text == alone.text and exit_layers == alone.exit_layers
    assert server.batcher.cache.rows_in_use == 0


def _slow_steps(monkeypatch, batcher, seconds):
    step = batcher.engine.step

    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return step(*args, **kwargs)

    monkeypatch.setattr(batcher.engine, "step", slowed)


def test_client_that_disconnects_mid_stream_frees_its_row(server, model, monkeypatch):
    _slow_steps(monkeypatch, server.batcher, 0.02)  # 100 tokens would take 2 s
    cancelled = server.batcher.finished["cancelled"]
    with httpx.Client(base_url=server.url, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json={"prompt": "go on", "max_tokens": 100, "temperature": 0,
                                                       "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    break  # one chunk, then hang up
    end = time.time() + 10
    while server.batcher.finished["cancelled"] == cancelled and time.time() < end:  # (_finish frees the row first)
        time.sleep(0.02)
    assert server.batcher.cache.rows_in_use == 0 and not server.batcher.rows
    assert server.batcher.finished["cancelled"] == cancelled + 1
    r = server.client.completions.create(prompt="next", max_tokens=3, temperature=0, model=model.name)
    assert r.usage.completion_tokens >= 1


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "no-such-model", "prompt": "x"}, 404, "does not exist"),
    ({"prompt": "x", "budget": 1.5}, 400, "(0, 1]"),
    ({"prompt": "x", "budget": 0}, 400, "(0, 1]"),
    ({"prompt": "x", "exit_layer": 3}, 400, "not attached"),
    ({"prompt": "x " * 200, "max_tokens": 8}, 400, "past the context"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "n": 2}, 400, "n=2"),
    ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "x", "dry_multiplier": -1}, 400, "dry_multiplier"),
    ({"prompt": "x", "dry_multiplier": 0.8, "dry_base": 0.5}, 400, "dry_base"),
    ({"prompt": "x", "dry_allowed_length": 2.0}, 400, "dry_allowed_length: Input should be a valid integer"),
    ({"prompt": "x", "logit_bias": {"5": 100}}, 400, "logit_bias is not supported"),
    ({"prompt": "x", "seed": 2**70}, 400, "seed must be an int"),
    ({"prompt": "x", "stop": [""]}, 400, "stop must be a non-empty string"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format is not supported"),
    # strict types: a boolean is not a number, a string not a boolean (each was accepted as one before)
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "temperature": True}, 400, "temperature: Input should be a valid number"),
    ({"prompt": "x", "budget": True}, 400, "budget: Input should be a valid number"),
    ({"prompt": "x", "exit_layer": True}, 400, "exit_layer: Input should be a valid integer"),
    ({"prompt": "x", "seed": True}, 400, "seed: Input should be a valid integer"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream: Input should be a valid boolean"),
    ({"prompt": "x", "confidence": 1.5}, 400, "confidence must be a number in [0, 1]"),
    ({"prompt": "x", "confidence": True}, 400, "confidence: Input should be a valid number"),
    ({"prompt": "x", "full_start": -3}, 400, "full_start must be 'auto' (a budget spends an opening where it fits)"),
    ({"prompt": "x", "full_start": "Auto"}, 400, "full_start must be 'auto' (a budget spends an opening where it "
                                                 "fits) or an int >= 0 (answer tokens taken at the full depth before "
                                                 "the request's route; 0: none), got 'Auto'"),
    ({"prompt": "x", "full_start": [3]}, 400, "full_start must be 'auto'"),
    ({"prompt": "x", "full_start": False}, 400, "full_start must be 'auto'"),
    ({"prompt": "x", "full_start": 2.0}, 400, "before the request's route; 0: none), got 2.0"),
    ({"prompt": "x", "n": "2"}, 400, "n: Input should be a valid integer"),
    ({"prompt": [True, False]}, 400, "prompt"),
    # a truthy string was taken for include_usage=True before
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "x"}}, 400,
     "invalid request: stream_options.include_usage: Input should be a valid boolean"),
    ({"prompt": "x", "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage"),
    ({"prompt": "x", "stream_options": "usage"}, 400, "stream_options"),
])
def test_bad_requests_get_openai_style_errors_and_the_server_keeps_serving(server, model, body, status, needle):
    with httpx.Client(base_url=server.url, timeout=30) as h:
        if isinstance(body, bytes):
            r = h.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = h.post("/v1/completions", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert needle in err["message"] and err["type"]
        ok = h.post("/v1/completions", json={"prompt": "still there?", "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_penalties_are_applied(server, model):
    """frequency_penalty (OpenAI's field), repetition_penalty and DRY (extra_body) reach the generation."""
    ids = model.tokenizer.encode("the the the the", add_special_tokens=False)
    kw = dict(prompt="the the the the", max_tokens=8, temperature=0, model=model.name)
    for extra, gen in [(dict(frequency_penalty=1.5), dict(frequency_penalty=1.5)),
                       (dict(extra_body={"repetition_penalty": 1.7}), dict(repetition_penalty=1.7)),
                       (dict(extra_body={"dry_multiplier": 2.0, "dry_allowed_length": 1}),
                        dict(dry_multiplier=2.0, dry_allowed_length=1))]:
        r = server.client.completions.create(**kw, **extra)
        alone = bx.generate(model, ids, max_new_tokens=8, calibration=None, **gen)
        assert r.choices[0].text == alone.text
    r = server.client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                              response_format={"type": "text"}, model=model.name)  # the default
    assert r.usage.completion_tokens >= 1


def test_health_and_metrics(server, model):
    with httpx.Client(base_url=server.url, timeout=30) as h:
        assert h.get("/health").json()["status"] == "ok"
        h.post("/v1/completions", json={"prompt": "count me", "max_tokens": 4, "temperature": 0, "exit_layer": 2})
        text = h.get("/metrics").text
    for name in ("balcony_queue_depth", "balcony_running_sequences", "balcony_tokens_per_second",
                 "balcony_time_to_first_token_seconds_bucket", "balcony_inter_token_latency_seconds_count"):
        assert name in text
    line = next(l for l in text.splitlines() if l.startswith('balcony_generated_tokens_total{exit="2"}'))
    assert float(line.split()[-1]) >= 4


def test_shutdown_finishes_running_requests_and_refuses_new_ones(model, monkeypatch):
    s = Server(model, max_batch=2, max_len=256)
    _slow_steps(monkeypatch, s.batcher, 0.005)  # 120 tokens take about 0.6 s
    got = {}

    def long_request():
        r = s.client.completions.create(model=model.name, prompt="long", max_tokens=120, temperature=0,
                                        extra_body={"exit_layer": 2})
        got["r"] = r

    t = threading.Thread(target=long_request)
    t.start()
    end = time.time() + 20
    while not s.batcher.rows and time.time() < end:
        time.sleep(0.01)
    assert s.batcher.running == 1
    s.close()  # SIGTERM: stop admitting, finish the running request, exit
    t.join(30)
    assert got["r"].usage.completion_tokens == len(_alone(model, "long", False, exit_layer=2,
                                                          max_new_tokens=120).tokens)
    assert not s.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=2)


@pytest.mark.parametrize("messages,needle", [
    ([{"role": "user"}], "messages[0] has no content"),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": None}], "messages[1] has no content"),
    ([{"role": "banana", "content": "hi"}], "messages[0].role must be one of system, developer, user, assistant"),
    ([{"role": "user", "content": []}], "messages[0] has no content (an empty list of parts)"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"},
                                   {"type": "image_url", "image_url": {"url": "data:,"}}]}],
     "messages[0].content[1] is of type 'image_url': this server reads text parts only"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0] is a text part without text"),
])
def test_chat_messages_without_content_or_with_unknown_roles_refused(server, model, messages, needle):
    with httpx.Client(base_url=server.url, timeout=30) as h:
        r = h.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]["message"]


def test_chat_content_parts_read_as_their_text(server, model):
    """OpenAI's content-parts form: the text parts joined by newlines, the same answer as that string."""
    parts = [{"type": "text", "text": "Why is the sky"}, {"type": "text", "text": "blue?"}]
    c = server.client
    r = c.chat.completions.create(model=model.name, messages=[{"role": "user", "content": parts}], max_tokens=8,
                                  temperature=0, extra_body={"exit_layer": 2})
    alone = _alone(model, "Why is the sky\nblue?", True, exit_layer=2, max_new_tokens=8)
    assert r.choices[0].message.content == alone.text
    assert r.usage.prompt_tokens == len(model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Why is the sky\nblue?"}], add_generation_prompt=True, tokenize=True))


def test_top_k_past_the_vocabulary_is_served(server, model):
    with httpx.Client(base_url=server.url, timeout=30) as h:  # (a 500 from an overflow inside the step before)
        r = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "top_k": 10**30, "seed": 1})
        assert r.status_code == 200, r.text
