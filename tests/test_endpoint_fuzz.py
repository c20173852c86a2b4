"""The live endpoint fuzzed over real HTTP: no request gets a 5xx, and none can fail another's.

The default run serves a real tiny model from `http_app.standalone_app` under a real uvicorn
on 127.0.0.1 (the same endpoint functions the Serve deployment calls, without Ray); the `slow`
run fuzzes the real Ray Serve deployment longer. Requests come from schemathesis, generated
from the endpoint's own /openapi.json (valid bodies and bodies that break the schema), and
from hypothesis, as concurrent bursts that share batches.
"""
import concurrent.futures
import json

import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.config import ServeConfig
from components.sampling import MIN_TOP_P
from pipelines import http_app
from pipelines.model_loading import FolderLoader
from tests.helpers import free_port, make_candidate, uvicorn_server

# Small limits, so that generated requests reach generation often instead of stopping at a limit.
CFG = ServeConfig(max_tokens_cap=16, max_batch_size=8, max_choices=4, max_queued_rows=64, batch_wait_timeout_s=0.01,
                  poll_interval_s=0, max_body_bytes=8192, max_prompt_chars=200)
SUPPRESS = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]


@pytest.fixture(scope="module")
def candidate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("endpoint_fuzz") / "candidate"
    return FolderLoader(str(folder), "tiny:v1", make_candidate(folder))


@pytest.fixture(scope="module")
def local_endpoint(candidate):
    """The endpoint of a real tiny model under a real uvicorn on 127.0.0.1; yields its base URL."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and the machine is shared
    engine = http_app.Engine(candidate, CFG, "cpu", "local")
    try:
        with uvicorn_server(http_app.standalone_app(engine)) as url:
            yield url
    finally:
        engine.stop()
        torch.set_num_threads(threads)


def _post(url: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{url}/v1/completions", data=data, headers={"Content-Type": "application/json"},
                         timeout=60, **kwargs)


def _still_answering(url: str) -> None:
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    answer = _post(url, {"prompt": "def f():", "max_tokens": 2, "temperature": 0})
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"], answer.text


# ----------------------------------------------------------------------------- the defects, over HTTP


def test_a_top_p_too_small_for_float32_is_a_400_and_fails_no_other_request(local_endpoint):
    greedy = {"prompt": "def add(a, b):\n", "max_tokens": 8, "temperature": 0}
    alone = _post(local_endpoint, greedy).json()["choices"][0]["text"]
    bad = {"prompt": "x = ", "max_tokens": 8, "temperature": 1, "top_p": 1e-46}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: _post(local_endpoint, body), [bad, greedy] * 4))
    for answer in answers[0::2]:
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "top_p", answer.text
    for answer in answers[1::2]:
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == alone, answer.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_with_a_lone_surrogate_is_a_400_naming_the_prompt(local_endpoint, stream):
    answer = _post(local_endpoint, b'{"prompt": "def \\ud800", "max_tokens": 4, "stream": %s}'
                   % (b"true" if stream else b"false"))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "prompt" and "UTF-8" in answer.json()["error"]["message"]


def test_the_schema_names_every_field_of_the_body(local_endpoint):
    schema = requests.get(f"{local_endpoint}/openapi.json", timeout=30).json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    fields = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]["properties"]
    assert {"prompt", "max_tokens", "temperature", "top_p", "stop", "n", "stream", "logprobs"} <= set(fields)


# ----------------------------------------------------------------------------- fuzzing


def fuzz_from_schema(url: str, examples: int) -> dict:
    """Send `examples` schemathesis cases per operation of the endpoint's /openapi.json; returns the tally."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    tally = {"requests": 0, "2xx": 0, "4xx": 0, "5xx": 0, "failures": []}
    for path, method in [("/v1/completions", "POST"), ("/healthz", "GET"), ("/v1/models", "GET")]:
        operation = schema[path][method]
        cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

        @settings(max_examples=examples if method == "POST" else 5, deadline=None, database=None,
                  suppress_health_check=SUPPRESS)
        @given(case=cases)
        def send(case):
            response = case.call(base_url=url, timeout=60)
            tally["requests"] += 1
            tally[f"{response.status_code // 100}xx"] = tally.get(f"{response.status_code // 100}xx", 0) + 1
            if response.status_code >= 500:
                tally["failures"].append((case.body, response.status_code, response.text[:300]))

        send()
    return tally


def _mostly(valid, invalid, one_in: int = 8):
    """Valid but one in `one_in`, so most requests reach generation (and shrinking leans to the valid side)."""
    return st.integers(1, one_in).flatmap(lambda i: invalid if i == one_in else valid)


# Any code point, lone surrogates included (what JSON's "\ud800" escape gives).
_ANY_TEXT = st.text(st.characters(exclude_categories=()), min_size=1, max_size=10)


# Bodies near the valid ones, sent at the same moment so that they share batches.
_BODIES = st.fixed_dictionaries({
    "prompt": _mostly(st.one_of(st.text(min_size=1, max_size=40), st.lists(st.text(min_size=1, max_size=20),
                                                                              min_size=1, max_size=2)),
                      st.one_of(st.just(""), _ANY_TEXT, st.lists(_ANY_TEXT, max_size=3))),
    "max_tokens": _mostly(st.integers(1, 16), st.integers(-1, 20)),
}, optional={
    "temperature": _mostly(st.one_of(st.just(0), st.floats(1e-3, 2)), st.sampled_from([1e-46, 1e-4, 2.5, -1])),
    # 1e-46 and 5e-324 are 0 in float32
    "top_p": _mostly(st.floats(MIN_TOP_P, 1), st.sampled_from([0, 1e-46, 5e-324, MIN_TOP_P / 10, 1.5]), one_in=4),
    "top_k": _mostly(st.integers(1, 400), st.integers(-1, 0)),
    "n": _mostly(st.integers(1, 2), st.integers(0, 5)),
    "seed": _mostly(st.integers(0, 2**63 - 1), st.sampled_from([-1, 2**64])),
    "stop": _mostly(st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=4)),
                    st.one_of(_ANY_TEXT, st.lists(st.text(max_size=3), max_size=6))),
    "logprobs": _mostly(st.integers(0, 5), st.integers(-1, 6)),
    "echo": st.booleans(), "stream": st.booleans(),
})


def fuzz_in_bursts(url: str, bursts: int) -> dict:
    """`bursts` groups of 1 to 6 generated bodies sent at once; returns the tally."""
    tally = {"requests": 0, "2xx": 0, "4xx": 0, "5xx": 0, "failures": []}

    @settings(max_examples=bursts, deadline=None, database=None, suppress_health_check=SUPPRESS)
    @given(burst=st.lists(_BODIES, min_size=1, max_size=6))
    def send(burst):
        with concurrent.futures.ThreadPoolExecutor(len(burst)) as pool:
            answers = list(pool.map(lambda body: _post(url, body), burst))
        for body, answer in zip(burst, answers):
            tally["requests"] += 1
            tally[f"{answer.status_code // 100}xx"] = tally.get(f"{answer.status_code // 100}xx", 0) + 1
            if answer.status_code >= 500 or (answer.status_code == 200 and "server_error" in answer.text):
                tally["failures"].append((body, answer.status_code, answer.text[-300:]))

    send()
    return tally


def _report(name: str, tally: dict) -> None:
    print(f"\n{name}: {tally['requests']} requests, {tally['2xx']} 2xx, {tally['4xx']} 4xx, {tally['5xx']} 5xx")


def test_the_schema_fuzz_gets_no_5xx_and_the_endpoint_still_answers(local_endpoint):
    tally = fuzz_from_schema(local_endpoint, examples=250)
    _report("schemathesis, local uvicorn", tally)
    assert tally["5xx"] == 0 and not tally["failures"], tally["failures"][:5]
    assert tally["2xx"] >= 10 and tally["4xx"] >= 10  # both kinds of answer were reached
    _still_answering(local_endpoint)


def test_concurrent_fuzzed_requests_get_no_5xx_and_the_endpoint_still_answers(local_endpoint):
    tally = fuzz_in_bursts(local_endpoint, bursts=100)
    _report("bursts, local uvicorn", tally)
    assert tally["5xx"] == 0 and not tally["failures"], tally["failures"][:5]
    assert tally["2xx"] >= 10
    _still_answering(local_endpoint)


# Slow: Serve starts on 2 cores in about a minute, and the run is longer. `./scripts/test -m slow tests/test_endpoint_fuzz.py`.
@pytest.mark.slow
@pytest.mark.integration
def test_the_serve_endpoint_fuzzed_longer_gets_no_5xx_and_still_answers(candidate):
    from pipelines import ray_runtime, serving

    cfg = ServeConfig(**{**CFG.__dict__, "port": free_port(), "num_cpus": 1})
    ray_runtime.init_ray(2)
    try:
        url = serving.deploy(candidate, cfg, timeout_s=300)
        try:
            schema_tally = fuzz_from_schema(url, examples=1500)
            burst_tally = fuzz_in_bursts(url, bursts=300)
            _report("schemathesis, Ray Serve", schema_tally)
            _report("bursts, Ray Serve", burst_tally)
            assert schema_tally["5xx"] == 0 and not schema_tally["failures"], schema_tally["failures"][:5]
            assert schema_tally["2xx"] >= 50  # Serve published the body's schema: generated bodies were valid too
            assert burst_tally["5xx"] == 0 and not burst_tally["failures"], burst_tally["failures"][:5]
            _still_answering(url)
        finally:
            serving.shutdown()
    finally:
        ray_runtime.shutdown_ray()
