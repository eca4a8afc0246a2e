"""The OpenAI HTTP API without Ray: FastAPI's TestClient in front of a tiny model (DirectBackend).

The unmodified `openai` client talks to the app through the TestClient (it is an httpx client), so the
response shapes are checked by the client's own parsing; error cases check status, envelope and param.
"""

import json

import openai
import pytest
from fastapi.testclient import TestClient

from raydist.config import ModelConfig
from raydist.config.serve import LimitSettings
from raydist.core.models import load_model
from raydist.serve.engine import BatchGenerator
from raydist.serve.http import DirectBackend, build_fastapi_app
from raydist.serve.service import ModelInfo, OpenAIService

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
    limits = LimitSettings(
        **{"max_prompt_tokens": 64, "max_tokens": 32, "default_chat_max_tokens": 8, "max_body_bytes": 4096, **limits}
    )
    info = ModelInfo("tiny", engine.max_positions, engine.model.config.vocab_size, 1700000000)
    rec = _Recorder()
    svc = OpenAIService(
        engine.tokenizer,
        backend or DirectBackend(engine),
        info,
        limits,
        api_key=api_key,
        observer=rec,
        ready=ready,
        stats=lambda: {"pid": 1},
    )
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
        direct.prompt_tokens,
        6,
        direct.prompt_tokens + 6,
    )
    streamed = list(c.completions.create(model="tiny", prompt="def main():", max_tokens=6, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == direct.text
    assert streamed[-1].choices[0].finish_reason == "length"

    chat = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        temperature=0,
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 8  # default_chat_max_tokens
    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
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
    ("completions", json.dumps({"prompt": ["a"] * 40}), 400, "prompt"),
    ("completions", '{"prompt": [1, 999999]}', 400, "prompt"),
    ("completions", '{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("completions", '{"prompt": "x", "max_tokens": 33}', 400, "max_tokens"),
    ("completions", '{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ("completions", '{"prompt": "x", "max_tokens": true}', 400, "max_tokens"),
    ("completions", '{"prompt": "x", "temperature": -1}', 400, "temperature"),
    ("completions", '{"prompt": "x", "temperature": 1e400}', 400, "temperature"),
    ("completions", '{"prompt": "x", "top_p": 2}', 400, "top_p"),
    ("completions", '{"prompt": "x", "n": 0}', 400, "n"),
    ("completions", '{"prompt": "x", "n": 100}', 400, "n"),
    ("completions", '{"prompt": "x", "n": 2, "best_of": 1}', 400, "best_of"),
    ("completions", '{"prompt": "x", "best_of": 50}', 400, "best_of"),
    ("completions", '{"prompt": "x", "best_of": 2, "stream": true}', 400, "best_of"),
    ("completions", '{"prompt": "x", "logprobs": 50}', 400, "logprobs"),
    ("completions", '{"prompt": "x", "logprobs": -1}', 400, "logprobs"),
    ("completions", '{"prompt": "x", "logprobs": true}', 400, "logprobs"),
    ("completions", '{"prompt": "x", "suffix": "y"}', 400, "suffix"),
    ("completions", '{"prompt": "x", "logit_bias": {"abc": 1}}', 400, "logit_bias"),
    ("completions", '{"prompt": "x", "logit_bias": {"1": 500}}', 400, "logit_bias"),
    ("completions", '{"prompt": "x", "logit_bias": {"99999999": 1}}', 400, "logit_bias"),
    ("completions", '{"prompt": "x", "presence_penalty": 3}', 400, "presence_penalty"),
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
    (
        "chat/completions",
        '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
        400,
        "messages",
    ),
    (
        "chat/completions",
        '{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
        400,
        "tools",
    ),
    (
        "chat/completions",
        '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "max_completion_tokens": 5}',
        400,
        None,
    ),
    ("chat/completions", '{"messages": "hello"}', 400, "messages"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x"}], "echo": true}', 400, "echo"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', 400, "top_logprobs"),
    (
        "chat/completions",
        '{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 30}',
        400,
        "top_logprobs",
    ),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x"}], "n": 9}', 400, "n"),
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


# -- logprobs, echo, n / best_of, prompt arrays, penalties, tokenizer routes ---------------------------


def _direct_logprobs(engine, ids):
    """log p(token j | tokens < j) for j >= 1 from one unpadded forward pass: what the server must report."""
    import torch

    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[j - 1, ids[j]]) for j in range(1, len(ids))], lp


def test_echo_logprobs_are_the_models_own_also_batched_with_left_padding(engine):
    from raydist.serve.engine import GenerationRequest, SamplingParams

    tok = engine.tokenizer
    short, long = tok.encode("def main():"), tok.encode("import os\nimport sys\n\nclass Config:\n    pass")
    reqs = [
        GenerationRequest(p, SamplingParams(max_tokens=3, temperature=0, logprobs=2), prompt_logprobs=3)
        for p in (short, long)
    ]
    for req, done in zip(reqs, engine.generate(reqs)):  # one left-padded batch: `short` is padded
        want, lp = _direct_logprobs(engine, req.prompt_ids + done.token_ids)
        n = len(req.prompt_ids)
        assert done.prompt_logprobs[0] is None and len(done.prompt_logprobs) == n
        assert [e.logprob for e in done.prompt_logprobs[1:]] == pytest.approx(want[: n - 1], abs=1e-4)
        assert [e.logprob for e in done.logprobs] == pytest.approx(want[n - 1 :], abs=1e-4)
        top = done.prompt_logprobs[1].top
        assert len(top) == 3 and [t for t, _ in top] == lp[0].topk(3).indices.tolist()
        assert done.logprobs[0].token_id == done.token_ids[0] == top_of(lp[n - 1])  # greedy: the argmax


def top_of(row):
    return int(row.argmax())


def test_lm_eval_loglikelihood_request_shape(client, engine):
    """What lm-eval's local-completions backend sends for a multiple-choice task, and what it reads back."""
    http, _ = client
    tok = engine.tokenizer
    context, continuation = tok.encode("The capital of France is"), tok.encode(" Paris")
    ids = context + continuation
    r = http.post(
        "/v1/completions",
        headers=AUTH,
        json={
            "model": "tiny",
            "prompt": [ids, context],
            "temperature": 0,
            "max_tokens": 1,
            "logprobs": 1,
            "seed": 1234,
            "echo": True,
        },
    )
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    lp = choices[0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want, _ = _direct_logprobs(engine, ids)
    ctxlen = len(context)
    assert lp["token_logprobs"][ctxlen:-1] == pytest.approx(want[ctxlen - 1 :], abs=1e-4)  # lm-eval's slice
    for value, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert value in top.values() or max(top.values()) >= value  # the token itself or a likelier one
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert choices[0]["text"].startswith(tok.decode(ids))
    assert r.json()["usage"]["prompt_tokens"] == len(ids) + len(context)


def test_logprobs_without_echo_and_streamed(client, engine):
    http, _ = client
    body = {"prompt": "def main():", "max_tokens": 5, "temperature": 0, "logprobs": 3}
    done = http.post("/v1/completions", headers=AUTH, json=body).json()["choices"][0]
    lp = done["logprobs"]
    assert len(lp["tokens"]) == 5 and all(len(t) >= 3 for t in lp["top_logprobs"])
    assert all(v == max(t.values()) for v, t in zip(lp["token_logprobs"], lp["top_logprobs"]))  # greedy
    assert "".join(lp["tokens"]) == done["text"]
    r = http.post("/v1/completions", headers=AUTH, json={**body, "stream": True, "echo": True})
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    streamed = [t for e in events for t in (e["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    prompt_len = len(engine.tokenizer.encode("def main():"))
    assert streamed[0] is None and len(streamed) == prompt_len + 5
    assert streamed[prompt_len:] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert "".join(e["choices"][0]["text"] for e in events) == "def main():" + done["text"]


def test_n_best_of_and_prompt_arrays(client):
    http, _ = client
    r = http.post(
        "/v1/completions",
        headers=AUTH,
        json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 4, "temperature": 1.0, "seed": 7},
    )
    body = r.json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert body["choices"][0]["text"] != body["choices"][1]["text"]  # seeds 7 and 8
    again = http.post(
        "/v1/completions",
        headers=AUTH,
        json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 4, "temperature": 1.0, "seed": 7},
    ).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in body["choices"]]
    assert body["usage"]["completion_tokens"] == 24
    best = http.post(
        "/v1/completions",
        headers=AUTH,
        json={"prompt": "x", "n": 1, "best_of": 4, "max_tokens": 4, "temperature": 1.0, "seed": 3, "logprobs": 0},
    ).json()
    assert len(best["choices"]) == 1 and best["usage"]["completion_tokens"] == 16
    every = [
        http.post(
            "/v1/completions",
            headers=AUTH,
            json={"prompt": "x", "max_tokens": 4, "temperature": 1.0, "seed": 3 + j, "logprobs": 0},
        ).json()["choices"][0]
        for j in range(4)
    ]
    score = [sum(c["logprobs"]["token_logprobs"]) for c in every]
    assert best["choices"][0]["text"] == every[score.index(max(score))]["text"]
    streamed = http.post(
        "/v1/completions", headers=AUTH, json={"prompt": "x", "n": 2, "max_tokens": 3, "temperature": 0, "stream": True}
    )
    events = [json.loads(e[6:]) for e in streamed.text.split("\n\n") if e.startswith("data: {")]
    assert {e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]} == {0, 1}


def test_penalties_and_logit_bias_change_the_greedy_choice(client, engine):
    http, _ = client
    base = {"prompt": "aaaa", "max_tokens": 12, "temperature": 0, "logprobs": 0}
    plain = http.post("/v1/completions", headers=AUTH, json=base).json()["choices"][0]
    biased = http.post("/v1/completions", headers=AUTH, json={**base, "logit_bias": {"7": 100}}).json()["choices"][0]
    assert set(biased["logprobs"]["tokens"]) == {engine.tokenizer.decode([7])}
    # logprobs stay the model's own: a +100 bias does not make the token certain
    assert max(biased["logprobs"]["token_logprobs"]) < -0.01
    penalized = http.post(
        "/v1/completions", headers=AUTH, json={**base, "frequency_penalty": 2.0, "presence_penalty": 2.0}
    ).json()["choices"][0]
    repeats = [len(c["logprobs"]["tokens"]) - len(set(c["logprobs"]["tokens"])) for c in (plain, penalized)]
    assert repeats[1] < repeats[0]


def test_chat_logprobs_n_and_refusal_field(client):
    http, _ = client
    r = http.post(
        "/v1/chat/completions",
        headers=AUTH,
        json={
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
            "n": 2,
        },
    )
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    c = body["choices"][0]
    assert c["message"]["refusal"] is None and c["logprobs"]["refusal"] is None
    content = c["logprobs"]["content"]
    assert len(content) == 4 and all(len(e["top_logprobs"]) == 2 for e in content)
    assert all(e["logprob"] == e["top_logprobs"][0]["logprob"] for e in content)  # greedy
    assert all(isinstance(e["bytes"], list) for e in content)
    plain = http.post(
        "/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    ).json()["choices"][0]
    assert plain["logprobs"] is None


def test_tokenize_detokenize_and_tokenizer_info(client, engine):
    http, _ = client
    r = http.post("/tokenize", headers=AUTH, json={"prompt": "def main():", "add_special_tokens": False})
    ids = engine.tokenizer.encode("def main():", add_special_tokens=False)
    assert r.json()["tokens"] == ids and r.json()["count"] == len(ids)
    assert http.post("/detokenize", headers=AUTH, json={"tokens": ids}).json()["prompt"] == "def main():"
    info = http.get("/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] == engine.tokenizer.eos_token
    chat = http.post("/tokenize", headers=AUTH, json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 1
    assert http.post("/tokenize", headers=AUTH, json={}).status_code == 400
    bad = http.post("/detokenize", headers=AUTH, json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={"prompt": "x"}).status_code == 401


def test_beyond_the_admitted_requests_the_reply_is_openais_error_json(engine):
    import asyncio

    import httpx

    http, rec = _app(engine, max_ongoing_requests=1, max_queued_requests=1, queue_full_status=429, retry_after_s=1.5)

    async def flood():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=http.app), base_url="http://t") as c:
            return await asyncio.gather(
                *[
                    c.post(
                        "/v1/completions",
                        headers=AUTH,
                        json={"prompt": f"p{i}", "max_tokens": 16, "stream": i % 2 == 1},
                    )
                    for i in range(6)
                ]
            )

    responses = asyncio.run(flood())
    assert [r.status_code for r in responses].count(200) == 2
    refused = [r for r in responses if r.status_code == 429]
    assert len(refused) == 4 and all(r.headers["retry-after"] == "2" for r in refused)
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in refused)
    assert [s for _, s in rec.requests].count(429) == 4
    assert http.post("/v1/completions", headers=AUTH, json={"prompt": "x", "max_tokens": 2}).status_code == 200
