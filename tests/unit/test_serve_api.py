"""The OpenAI HTTP API without Ray: FastAPI's TestClient in front of a tiny model (DirectBackend).

The unmodified `openai` client talks to the app through the TestClient (it is an httpx client), so the
response shapes are checked by the client's own parsing; error cases check status, envelope and param.
"""

import json

import openai
import pytest
from fastapi.testclient import TestClient

from raydist.components.models import load_model
from raydist.config import ModelConfig
from raydist.config.serve import LimitSettings
from raydist.serve.engine import BatchGenerator
from raydist.serve.service import DirectBackend, ModelInfo, OpenAIService, build_fastapi_app

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


class _Recorder:
    def __init__(self):
        self.requests, self.token_counts = [], []

    def request_done(self, route, status, latency_s):
        self.requests.append((route, status))

    def tokens(self, prompt_tokens, completion_tokens):
        self.token_counts.append((prompt_tokens, completion_tokens))


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    return BatchGenerator(load_model(ModelConfig(path="tiny-random"), seed=0), tiny_tokenizer)


def _app(engine, backend=None, api_key=KEY, ready=lambda: True, **limits):
    limits = LimitSettings(**{"max_prompt_tokens": 64, "max_tokens": 32, "default_chat_max_tokens": 8,
                              "max_body_bytes": 4096, **limits})
    info = ModelInfo("tiny", engine.max_positions, engine.model.config.vocab_size, 1700000000)
    rec = _Recorder()
    svc = OpenAIService(engine.tokenizer, backend or DirectBackend(engine), info, limits, api_key=api_key,
                        observer=rec, ready=ready, stats=lambda: {"pid": 1})
    return TestClient(build_fastapi_app(svc)), rec


@pytest.fixture(scope="module")
def client(engine):
    return _app(engine)


def test_openai_client_completions_chat_streaming_and_models(client, engine):
    http, rec = client
    c = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert c.models.retrieve("tiny").id == "tiny"
    done = c.completions.create(model="tiny", prompt="def main():", max_tokens=6, temperature=0)
    direct = engine.generate([engine_request(engine, "def main():", 6)])[0]
    assert done.choices[0].text == direct.text and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (
        direct.prompt_tokens, 6, direct.prompt_tokens + 6)
    streamed = list(c.completions.create(model="tiny", prompt="def main():", max_tokens=6, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == direct.text
    assert streamed[-1].choices[0].finish_reason == "length"

    chat = c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Hi"}], temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 8  # default_chat_max_tokens
    chunks = list(c.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chat.usage.total_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert ("/v1/completions", 200) in rec.requests and rec.token_counts


def engine_request(engine, text, n):
    from raydist.serve.engine import GenerationRequest, SamplingParams

    return GenerationRequest(engine.tokenizer.encode(text), SamplingParams(max_tokens=n, temperature=0))


def test_stream_is_server_sent_events_ending_with_done(client):
    http, _ = client
    r = http.post("/v1/completions", headers=AUTH, json={"prompt": "x", "max_tokens": 3, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_api_key_is_required_on_v1_routes_only(engine):
    http, _ = _app(engine)
    assert http.get("/health").status_code == 200 and http.get("/ready").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = http.post("/v1/completions", headers=headers, json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        assert http.get("/v1/models", headers=headers).status_code == 401
        assert http.get("/stats", headers=headers).status_code == 401
    c = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()
    open_http, _ = _app(engine, api_key=None)
    assert open_http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert _app(engine, ready=lambda: False)[0].get("/ready").status_code == 503


BAD_REQUESTS = [
    # (route, raw body, status, param or code in the error)
    ("completions", "{", 400, None),
    ("completions", "[1, 2]", 400, None),
    ("completions", "", 400, None),
    ("completions", '{"prompt": "x", "temperature": NaN}', 400, None),
    ("completions", '{"prompt": "\\ud800"}', 400, "prompt"),
    ("completions", '{"prompt": 5}', 400, "prompt"),
    ("completions", '{"prompt": ["a", "b"]}', 400, "prompt"),
    ("completions", '{"prompt": [1, 999999]}', 400, "prompt"),
    ("completions", '{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("completions", '{"prompt": "x", "max_tokens": 33}', 400, "max_tokens"),
    ("completions", '{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ("completions", '{"prompt": "x", "max_tokens": true}', 400, "max_tokens"),
    ("completions", '{"prompt": "x", "temperature": -1}', 400, "temperature"),
    ("completions", '{"prompt": "x", "temperature": 1e400}', 400, "temperature"),
    ("completions", '{"prompt": "x", "top_p": 2}', 400, "top_p"),
    ("completions", '{"prompt": "x", "n": 2}', 400, "n"),
    ("completions", '{"prompt": "x", "best_of": 3}', 400, "best_of"),
    ("completions", '{"prompt": "x", "logprobs": 2}', 400, "logprobs"),
    ("completions", '{"prompt": "x", "echo": true}', 400, "echo"),
    ("completions", '{"prompt": "x", "frobnicate": 1}', 400, "frobnicate"),
    ("completions", '{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    ("completions", '{"prompt": "x", "stop": [1]}', 400, "stop"),
    ("completions", '{"prompt": "x", "seed": 99999999999999999999999}', 400, "seed"),
    ("completions", '{"prompt": "x", "stream_options": {"include_usage": true}}', 400, "stream_options"),
    ("completions", '{"prompt": "x", "model": "gpt-4"}', 404, "model_not_found"),
    ("completions", json.dumps({"prompt": "word " * 100}), 400, "context_length_exceeded"),
    ("completions", "[" * 2000 + "]" * 2000, 400, None),  # deeper than the JSON parser recurses
    ("chat/completions", '{"messages": []}', 400, "messages"),
    ("chat/completions", '{"messages": [{"role": "tool", "content": "x"}]}', 400, "messages"),
    ("chat/completions", '{"messages": [{"role": "user"}]}', 400, "messages"),
    ("chat/completions", '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     400, "messages"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
     400, "tools"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, '
     '"max_completion_tokens": 5}', 400, None),
    ("chat/completions", '{"messages": "hello"}', 400, "messages"),
]


@pytest.mark.parametrize("route,body,status,where", BAD_REQUESTS)
def test_bad_requests_get_openai_style_4xx(client, route, body, status, where):
    http, _ = client
    r = http.post(f"/v1/{route}", headers={**AUTH, "Content-Type": "application/json"}, content=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if where is not None:
        assert where in (err["param"], err["code"]), err


def test_body_size_limit_with_and_without_content_length(client):
    http, _ = client
    big = json.dumps({"prompt": "x" * 5000})
    r = http.post("/v1/completions", headers=AUTH, content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b" " * 1000

    r = http.post("/v1/completions", headers=AUTH, content=chunks())
    assert r.status_code == 413


def test_default_max_tokens_is_shortened_to_the_context_but_an_explicit_one_is_refused(engine):
    http, _ = _app(engine, max_prompt_tokens=600, max_tokens=32)
    ctx = engine.max_positions
    prompt = [10 + i % 400 for i in range(ctx - 4)]
    r = http.post("/v1/completions", headers=AUTH, json={"prompt": prompt, "max_tokens": 10})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = http.post("/v1/completions", headers=AUTH, json={"prompt": prompt, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4


def test_a_failing_backend_gives_500_and_the_app_keeps_serving(engine):
    class Flaky:
        def __init__(self):
            self.calls = 0

        async def submit(self, request):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("boom")
            async for out in DirectBackend(engine).submit(request):
                yield out

    http, rec = _app(engine, backend=Flaky())
    r = http.post("/v1/completions", headers=AUTH, json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert http.post("/v1/completions", headers=AUTH, json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert [s for _, s in rec.requests] == [500, 200]
    assert http.get("/nowhere").json()["error"]["code"] == "not_found"
    assert http.get("/v1/completions", headers=AUTH).status_code == 405
