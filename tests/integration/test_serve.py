"""`raydist serve` on the session's local Ray: real HTTP, the unmodified `openai` client, a tiny model.

Three applications share one Serve instance (one proxy on a free port) and are deployed once:
``secure`` (API key, small limits, batching, a short queue), ``open`` (no key; started through
`run_serve`, the CLI's entry point) and ``auto`` (autoscaling 1..2 replicas with short delays; started
through `app_builder`, what `serve run raydist.serve:app_builder` calls).
"""

import asyncio
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

# Serve's autoscaler sees load through metrics its handles push every 10 s by default; shorter intervals
# let the autoscaling test finish in seconds. These must be set before Ray starts: pytest imports this
# module while collecting, before the session fixture in conftest.py calls ray.init.
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")

pytestmark = pytest.mark.integration

KEY = "sk-integration-key"
MODEL = "tiny-served"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_artifact(out: Path) -> Path:
    """A tiny random Llama with an untied head (varied greedy continuations) and the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    from raydist.config import TinyModelSpec
    from raydist.core.artifact import write_manifest
    from raydist.core.models import save_model_dir, tiny_llama_config, tiny_tokenizer

    config = tiny_llama_config(TinyModelSpec())
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a zero EOS logit is almost never the largest: greedy answers run to max_tokens
        model.lm_head.weight[config.eos_token_id] = 0.0
    save_model_dir(model, tiny_tokenizer(), out)
    write_manifest(
        out,
        stage="finetune",
        config={},
        parent={"path": "tiny-random"},
        metrics={},
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ray import serve

    from raydist.config import ServeConfig
    from raydist.serve.app import app_builder, build_app, run_serve

    artifact = _make_artifact(tmp_path_factory.mktemp("serve") / MODEL)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"artifact": str(artifact), "resources": {"num_cpus": 0.25}, "health": {"check_period_s": 2}}
    secure = ServeConfig(
        **common,
        auth={"api_key": KEY},
        limits={
            "max_prompt_tokens": 128,
            "max_tokens": 64,
            "max_body_bytes": 16384,
            "max_ongoing_requests": 16,
            "max_queued_requests": 8,
            "queue_full_status": 429,
            "retry_after_s": 2,
        },
        batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
    )
    serve.run(build_app(secure), name="secure", route_prefix="/secure")
    url = run_serve(
        ServeConfig(**common, app_name="open", route_prefix="/open", model_name="open-model", http={"port": port}),
        blocking=False,
        verbose=False,
    )
    assert url == f"http://127.0.0.1:{port}/open/v1"
    serve.run(
        app_builder(
            {
                **common,
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 2,
                    "upscale_delay_s": 1,
                    "downscale_delay_s": 2,
                    "look_back_period_s": 2,
                },
                "batching": {"enabled": False},
            }
        ),
        name="auto",
        route_prefix="/auto",
    )
    yield {"base": f"http://127.0.0.1:{port}", "artifact": artifact}
    serve.shutdown()


@pytest.fixture(scope="module")
def reference(server):
    """The same artifact decoded in this process: what the server must answer for greedy requests."""
    from raydist.serve.engine import BatchGenerator, GenerationRequest, SamplingParams
    from raydist.serve.loading import load_served_model

    model, tok, _ = load_served_model(str(server["artifact"]), None, "cpu", "auto")
    engine = BatchGenerator(model, tok)

    def greedy(prompt: str, max_tokens: int) -> str:
        return engine.generate([GenerationRequest(tok.encode(prompt), SamplingParams(max_tokens, 0.0))])[0].text

    return greedy


def _client(server, app="secure", key=KEY, **kw):
    return openai.OpenAI(base_url=f"{server['base']}/{app}/v1", api_key=key, max_retries=0, **kw)


def _stats(server, app="secure"):
    return httpx.get(f"{server['base']}/{app}/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()


def test_openai_client_completions_chat_streaming_models(server, reference):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == [MODEL]
    done = c.completions.create(model=MODEL, prompt="def main():", max_tokens=12, temperature=0)
    assert done.choices[0].text == reference("def main():", 12) and done.choices[0].text.strip()
    assert done.usage.completion_tokens == 12 and done.usage.total_tokens == done.usage.prompt_tokens + 12
    seeded = [
        c.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=1.0, seed=42).choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    stream = list(c.completions.create(model=MODEL, prompt="def main():", max_tokens=12, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in stream) == done.choices[0].text
    assert stream[-1].choices[0].finish_reason == "length"

    msgs = [{"role": "user", "content": "Name a colour."}]
    chat = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=msgs,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10
    # On the wire: server-sent events, the last one [DONE].
    with httpx.stream(
        "POST",
        f"{server['base']}/secure/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"prompt": "x", "max_tokens": 3, "stream": True},
        timeout=30,
    ) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"


def test_api_key_on_and_off(server):
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").models.list()
    r = httpx.post(f"{server['base']}/secure/v1/completions", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for route in ("health", "ready"):  # probes need no key
        assert httpx.get(f"{server['base']}/secure/{route}", timeout=30).status_code == 200
    r = httpx.post(f"{server['base']}/open/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "open-model"
    assert _client(server, app="open", key="anything").models.list().data[0].id == "open-model"


def test_concurrent_requests_are_batched(server, reference):
    before = _stats(server)
    prompts = [f"prompt number {i} says" for i in range(8)]

    async def burst():
        c = openai.AsyncOpenAI(base_url=f"{server['base']}/secure/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(
            *[c.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0) for p in prompts]
        )

    results = asyncio.run(burst())
    after = _stats(server)
    # Batched rows decode exactly as lone requests do.
    assert [r.choices[0].text for r in results] == [reference(p, 24) for p in prompts]
    # Really batched: decode steps served several requests each (continuous batching on the replica).
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decoded_rows"] - before["decoded_rows"]
    assert after["largest_batch"] >= 2 and rows / steps >= 2, (before, after)
    assert after["groups"] - before["groups"] <= len(prompts)


def _hostile_requests():
    """~300 malformed or hostile requests: (method, path suffix, headers, body)."""
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bodies = [
        "",
        "{",
        "}",
        "[]",
        "null",
        "42",
        '"str"',
        "{'single': 'quotes'}",
        '{"prompt": "x",}',
        "\x00\x01\x02",
        b"\xff\xfe\xfa garbage",
        '{"prompt": "x", "temperature": NaN}',
        '{"prompt": "x", "top_p": Infinity}',
        "[" * 3000 + "]" * 3000,
        '{"a":' * 2000 + "1" + "}" * 2000,
        '{"prompt": "' + "9" * 5000 + '"',
        '{"prompt": ' + "9" * 5000 + "}",
    ]
    fields = {
        "prompt": [
            None,
            5,
            1.5,
            True,
            {},
            [],
            [[]],
            ["a", "b"],
            [-1],
            [10**12],
            [1, "a"],
            "w " * 500,
            "\ud800",
            "x" * 20000,
        ],
        "max_tokens": [0, -1, -(2**63), 2**70, 65, 1e9, "16", None, True, [], 1.5],
        "temperature": [-0.1, 2.5, "hot", [], 1e308, -1e308],
        "top_p": [-1, 1.01, "all", {}],
        "n": [0, 2, 100, -1, "1"],
        "stream": ["yes", 1, None, []],
        "stop": [5, [1, 2], ["a"] * 10, {"x": 1}, ["x" * 1000]],
        "seed": [2**80, "seed", 1.5, -(2**80)],
        "model": ["gpt-4", "", 123, ["x"], "\u202e" * 10],
        "logprobs": [5, True],
        "echo": [True],
        "best_of": [2],
        "suffix": ["s"],
        "logit_bias": [{"1": 100}],
        # the parity fields, past their limits: 400s naming them
        "top_logprobs": [30, -1],
        "token_ids": [[1]],
        "logit_bias_bad": [{"99999999": 1}, {"-5": 1}, {"1": "x"}, {"1": 500}],
        "presence_penalty": [1.0, 5],
        "frequency_penalty": [-3],
        "stream_options": [{"include_usage": True}, "x"],
        "unknown_field": [1],
        "__proto__": [{}],
        "functions": [[{}]],
    }
    out = [("POST", route, auth, b) for b in bodies for route in ("/v1/completions", "/v1/chat/completions")]
    for field, values in fields.items():
        for v in values:
            for stream in (False, True):  # a bad request must be refused before any stream starts
                body = {"prompt": "hello", "max_tokens": 4, "stream": stream, field: v}
                if field == "logit_bias_bad":
                    body["logit_bias"] = body.pop(field)
                if field == "prompt" and v is None:
                    body.pop("prompt")
                out.append(("POST", "/v1/completions", auth, json.dumps(body)))  # "\ud800" stays a lone surrogate
                if field != "prompt":
                    chat = {k: x for k, x in body.items() if k != "prompt"}
                    chat["messages"] = [{"role": "user", "content": "hello"}]
                    out.append(("POST", "/v1/chat/completions", auth, json.dumps(chat)))
    # completions-only parity fields beyond the caps: logprobs > max_logprobs, n > max_n, best_of < n, token ids
    # outside the vocabulary, too many prompts
    for extra in (
        {"logprobs": 50},
        {"logprobs": -1},
        {"n": 3, "best_of": 2},
        {"best_of": 500},
        {"prompt": [[1, 2], [10**9]]},
        {"prompt": [[-3]]},
        {"prompt": ["a"] * 500},
        {"echo": True, "logprobs": 50},
        {"prompt": [], "echo": True},
    ):
        out.append(("POST", "/v1/completions", auth, json.dumps({"prompt": "hello", "max_tokens": 4, **extra})))
    chat_cases = [
        {"messages": None},
        {"messages": []},
        {"messages": "hi"},
        {"messages": [{}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        {"messages": [{"role": "user", "content": "x" * 30000}]},
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000},
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 99},
        {"messages": [{"role": "user", "content": "hi"}], "echo": True},
        {"messages": [{"role": "user", "content": "hi"}], "n": 99},
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
        {"messages": [{"role": "user", "content": "hi"}] * 400},
        {"messages": [{"role": "user", "content": "hi", "extra": 1}]},
    ]
    for case in chat_cases:
        for max_tokens in (None, -5, "x"):
            body = {k: v for k, v in case.items() if v is not None}
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            out.append(("POST", "/v1/chat/completions", auth, json.dumps(body)))
    keys = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer " + "k" * 10000},
        {"Authorization": KEY},
        {"Authorization": "bearer x y"},
    ]
    for h in keys:
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
            out.append(("GET" if path.endswith("models") else "POST", path, h, '{"prompt": "x"}'))
    huge = "x" * 40000
    out += [("POST", "/v1/completions", auth, json.dumps({"prompt": huge}))] * 3
    out += [
        ("POST", "/v1/completions", {**auth, "Content-Length": "99999999"}, "{}"),
        ("POST", "/v1/completions", {**auth, "Content-Type": "text/plain"}, "hello"),
        ("GET", "/v1/completions", auth, None),
        ("PUT", "/v1/chat/completions", auth, "{}"),
        ("DELETE", "/v1/models", auth, None),
        ("GET", "/v1/models/other-model", auth, None),
        ("GET", "/v1/../../etc/passwd", auth, None),
        ("POST", "/v1/embeddings", auth, "{}"),
        ("GET", "/%00", auth, None),
    ]
    return out


def test_hostile_requests_never_get_a_5xx_and_the_server_keeps_answering(server, reference):
    cases = _hostile_requests()
    assert len(cases) >= 300
    pid = _stats(server)["pid"]
    sem = asyncio.Semaphore(4)  # below max_ongoing_requests: this test is about input, not load

    async def send(client, method, path, headers, body):
        async with sem:
            content = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
            try:
                r = await client.request(method, f"{server['base']}/secure{path}", headers=headers, content=content)
            except Exception as e:  # noqa: BLE001 - the client itself refuses a Content-Length its body lacks
                return method, path, type(e).__name__, ""
            return method, path, r.status_code, r.text[:200]

    async def run_all():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[send(client, *c) for c in cases])

    results = asyncio.run(run_all())
    statuses = [r[2] for r in results]
    server_errors = [r for r in results if isinstance(r[2], int) and r[2] >= 500]
    assert not server_errors, server_errors[:5]
    client_side = [r for r in results if not isinstance(r[2], int)]
    assert len(client_side) <= 1, client_side
    # a few are valid: stream/max_tokens null, and on completions echo, logprobs 5, best_of 2, n 2, penalties,
    # logit_bias
    assert sum(isinstance(s, int) and 400 <= s < 500 for s in statuses) >= len(cases) - 40
    assert sum(s == 401 for s in statuses) >= 15 and sum(s == 413 for s in statuses) >= 1
    # The replica survived (same process) and still answers correctly.
    assert _stats(server)["pid"] == pid
    assert _client(server).completions.create(model=MODEL, prompt="def main():", max_tokens=12, temperature=0).choices[
        0
    ].text == reference("def main():", 12)


OPENAPI = Path(__file__).resolve().parents[3] / "shared" / "openai-openapi" / "openapi.json"


def _openai_spec(narrow: bool) -> dict:
    """OpenAI's published OpenAPI description, cut to the routes this server has, ``model`` pinned to the served
    id and ``stream`` to false (streams are checked with the openai client above).

    ``narrow``: request bodies keep only the fields this server implements (the rest are refused by name:
    ``raydist.serve.schemas.REFUSED_FIELDS``) and text-only messages, so most generated requests reach the model.
    One deliberate deviation is written into the response schema: with ``echo`` the first prompt token's logprob
    is null (nothing precedes it), as OpenAI's own legacy API and vLLM answer."""
    from raydist.serve.schemas import ChatCompletionRequest, CompletionRequest

    spec = json.loads(OPENAPI.read_text())
    spec["paths"] = {p: spec["paths"][p] for p in ("/completions", "/chat/completions", "/models")}
    spec["servers"] = [{"url": "http://127.0.0.1/v1"}]
    schemas = spec["components"]["schemas"]
    choice = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]["properties"]
    lp = choice["logprobs"]["anyOf"][0]["properties"]
    lp["token_logprobs"]["items"] = {"type": ["number", "null"]}
    lp["top_logprobs"]["items"] = {"anyOf": [lp["top_logprobs"]["items"], {"type": "null"}]}
    pins = {"model": {"type": "string", "enum": [MODEL]}, "stream": {"type": "boolean", "enum": [False]}}
    for name, ours, needed in (
        ("CreateCompletionRequest", CompletionRequest, "prompt"),
        ("CreateChatCompletionRequest", ChatCompletionRequest, "messages"),
    ):
        if not narrow:
            schemas[name] = {"allOf": [schemas[name], {"type": "object", "properties": pins, "required": ["model"]}]}
            continue
        props: dict = {}
        for part in schemas[name].get("allOf", [schemas[name]]):
            if "$ref" in part:
                part = schemas[part["$ref"].rsplit("/", 1)[1]]
            props.update(part.get("properties", {}))
        keep = {
            k: v
            for k, v in props.items()
            if k in ours.model_fields
            and k
            not in (
                "suffix",
                "tools",
                "tool_choice",
                "functions",
                "function_call",
                "parallel_tool_calls",
                "response_format",
            )
        }
        if "messages" in keep:
            keep["messages"] = {
                "type": "array",
                "minItems": 1,
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "additionalProperties": False,
                    "properties": {
                        "role": {"enum": ["system", "developer", "user", "assistant"]},
                        "content": {"type": "string"},
                    },
                },
            }
        schemas[name] = {
            "type": "object",
            "properties": {**keep, **pins},
            "required": ["model", needed],
            "additionalProperties": False,
        }
    return spec


@pytest.mark.parametrize("narrow", [False, True], ids=["full-spec", "implemented-fields"])
def test_schemathesis_from_openais_spec_no_5xx_and_every_200_conforms(server, reference, narrow):
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    schema = schemathesis.openapi.from_dict(_openai_spec(narrow))
    base = f"{server['base']}/secure/v1"
    statuses: list[int] = []
    for path, method in (("/completions", "POST"), ("/chat/completions", "POST"), ("/models", "GET")):
        op = schema[path][method]

        @hypothesis.settings(
            max_examples=60 if method == "POST" else 5,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            derandomize=True,
        )
        @hypothesis.given(case=op.as_strategy())
        def check(case):
            r = case.call(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            statuses.append(r.status_code)
            case.validate_response(r, checks=[not_a_server_error, response_schema_conformance])

        check()
    ok = statuses.count(200)
    assert ok >= (40 if narrow else 5), statuses  # enough requests reached the model
    assert all(s < 500 for s in statuses)
    assert _client(server).completions.create(model=MODEL, prompt="def main():", max_tokens=12, temperature=0).choices[
        0
    ].text == reference("def main():", 12)


def test_full_queue_answers_429_with_retry_after(server):
    async def flood():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *[
                    client.post(
                        f"{server['base']}/secure/v1/completions",
                        headers={"Authorization": f"Bearer {KEY}"},
                        json={"prompt": f"flood {i}", "max_tokens": 64, "temperature": 0},
                    )
                    for i in range(40)
                ]
            )

    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected and codes.count(200) >= 8
    assert all(r.headers.get("retry-after") == "2" for r in rejected)
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in rejected)  # OpenAI's error body
    assert _client(server).completions.create(model=MODEL, prompt="after", max_tokens=2).choices[0].text is not None


def _running_replicas(app: str) -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments["OpenAIServer"]
    return dep.replica_states.get("RUNNING", 0)


@pytest.mark.filterwarnings("ignore:.*look_back_period_s.*:FutureWarning")  # short windows are the point here
def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(server):
    assert _running_replicas("auto") == 1
    stop = threading.Event()
    errors = []

    def hammer():
        c = _client(server, app="auto")
        while not stop.is_set():
            try:
                c.completions.create(model=MODEL, prompt="load", max_tokens=64, temperature=0)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 60
        while _running_replicas("auto") < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert _running_replicas("auto") == 2, "no second replica under sustained load"
        time.sleep(1.0)  # both replicas take traffic
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:3]
    deadline = time.time() + 60
    while _running_replicas("auto") > 1 and time.time() < deadline:
        time.sleep(0.5)
    assert _running_replicas("auto") == 1, "the extra replica stayed after the load stopped"


def test_killed_replica_is_restarted_and_requests_succeed_again(server):
    old_pid = _stats(server, "open")["pid"]
    os.kill(old_pid, signal.SIGKILL)
    c = _client(server, app="open")
    deadline, answer = time.time() + 90, None
    while time.time() < deadline:
        try:
            answer = c.completions.create(model="open-model", prompt="back?", max_tokens=4)
            break
        except (openai.APIStatusError, openai.APIConnectionError):
            time.sleep(0.5)
    assert answer is not None and answer.usage.completion_tokens == 4
    assert _stats(server, "open")["pid"] != old_pid


def test_prometheus_metrics_are_exported(server):
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = [
        "ray_raydist_serve_requests_total",
        "ray_raydist_serve_generated_tokens_total",
        "ray_raydist_serve_batch_size_bucket",
        "ray_raydist_serve_request_latency_ms_bucket",
        "ray_raydist_serve_waiting_requests",
    ]
    deadline, text = time.time() + 45, ""
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(1)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    assert 'route="/v1/completions"' in text and 'status="401"' in text
