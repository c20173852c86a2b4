"""The continuous engine in one process (rows joining and leaving at every step), and behind real HTTP."""
import json
import threading
import time

import pytest
import requests
import torch

from components.batching import Overloaded, Work
from components.config import ServeConfig
from components.continuous import ContinuousBatcher, ContinuousEngine
from components.rows import Row, Sampling, TokenText
from components.generation import generate_batch
from components.model import GPT, GPTConfig
from components.tokenizer import EOT_ID, train_tokenizer
from tests.helpers import make_candidate, uvicorn_server

PROMPTS = ["def add(a, b):\n", "x = [1, 2", "print(x)\n", "def f", "x = [1, 2, 3]\nprint(x)\ndef add(a, b):"]


CORPUS = ["def add(a, b):\n    return a + b\n", "x = [1, 2, 3]\nprint(x)\n"] * 20


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer GPT with sharp random weights (each greedy token depends on the whole context, so a key
    masked wrongly, or a neighbour's, changes the text), its tokenizer and token strings."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return model, tokenizer, TokenText(tokenizer, 300)


class _Out:
    """What one row was sent."""

    def __init__(self):
        self.deltas, self.failures = [], []

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def finish(self):
        return self.deltas[-1].finish_reason if self.deltas else None


def _rows(tiny, prompt, sampling, n=1, seed=None, fail=True):
    _, tokenizer, _ = tiny
    outs = [_Out() for _ in range(n)]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    failures = outs[0].failures
    rows = [Row(tokenizer.encode(prompt).ids, prompt, sampling, o.deltas.append, gen,
                failures.append if fail else None) for o in outs]
    return rows, outs


def _alone_static(tiny, prompt, sampling, n=1, seed=None):
    model, _, text = tiny
    rows, outs = _rows(tiny, prompt, sampling, n, seed)
    generate_batch(model, text, rows, EOT_ID)
    return outs


def _drive(engine: ContinuousEngine, joins: dict[int, list[Row]], on_step=lambda step: None) -> int:
    """Step until every row has finished; `joins[i]` join before step i. Returns the steps taken."""
    step = 0
    while step <= max(joins, default=0) or engine.running():
        engine.step(joins.get(step, []))
        on_step(step)
        step += 1
        assert step < 1000
    return step


@pytest.mark.parametrize("kernel", [True, False], ids=["decode-kernel", "masked-batch"])
def test_rows_joining_and_leaving_give_each_rows_greedy_text_alone(tiny, kernel):
    """Both attention paths: the CPU float32 kernel, and the masked batched call (GPU, other dtypes)."""
    model, _, text = tiny
    lengths = [3, 20, 7, 30, 12]
    alone = [_alone_static(tiny, p, Sampling(max_tokens=m, temperature=0))[0] for p, m in zip(PROMPTS, lengths)]
    engine = ContinuousEngine(model, text, EOT_ID, slots=3)
    assert engine.cache.kernel  # float32 on the CPU
    engine.cache.kernel = kernel
    made = [_rows(tiny, p, Sampling(max_tokens=m, temperature=0)) for p, m in zip(PROMPTS, lengths)]
    seen_slots = []
    # two start; a third joins at step 2; the first (3 tokens) leaves at step 2, the fourth takes its slot at 4
    _drive(engine, {0: made[0][0] + made[1][0], 2: made[2][0], 4: made[3][0], 10: made[4][0]},
           on_step=lambda s: seen_slots.append([r is not None for r in engine.slots]))
    for (rows, outs), want in zip(made, alone):
        assert outs[0].text == want.text and outs[0].finish == want.finish
        assert outs[0].deltas[-1].completion_tokens == want.deltas[-1].completion_tokens
    assert [o[0].finish for _, o in made[:2]] == ["length", "length"]
    assert seen_slots[2] == [False, True, True]  # the 3-token row left at once; the other two run on
    assert seen_slots[4] == [True, True, True]  # the joiner took the freed lowest slot
    assert engine.running() == 0 and sum(engine.cache.lengths) == 0
    with pytest.raises(ValueError, match="4 rows cannot join: 3 of 3 slots are free"):
        engine.step([made[0][0][0]] * 4)


def test_the_cache_grows_with_the_longest_row_and_shrinks_after_it_left(tiny):
    model, _, text = tiny
    long_row, short_row = (PROMPTS[4], 40), (PROMPTS[0], 20)
    alone = [_alone_static(tiny, p, Sampling(max_tokens=m, temperature=0))[0] for p, m in (long_row, short_row)]
    engine = ContinuousEngine(model, text, EOT_ID, slots=2)
    made = [_rows(tiny, p, Sampling(max_tokens=m, temperature=0)) for p, m in (long_row, short_row)]
    capacities = []
    # the short row joins late enough to be half-way when the long one (past 32 positions) leaves
    _drive(engine, {0: made[0][0], 30: made[1][0]}, on_step=lambda s: capacities.append(engine.cache.capacity))
    assert capacities[0] == 32 and max(capacities) == 64 == model.config.block_size
    assert capacities[-1] == 32  # shrunk while the short row ran on (its keys copied across)
    assert engine.cache.k[0].shape[2] == 32
    for (_, outs), want in zip(made, alone):
        assert outs[0].text == want.text and outs[0].finish == "length"


def test_seeded_sampling_is_the_same_alone_and_in_company(tiny):
    model, _, text = tiny
    sampling = Sampling(max_tokens=12, temperature=0.9, top_k=40, top_p=0.9)
    alone = _alone_static(tiny, PROMPTS[0], sampling, n=2, seed=7)
    engine = ContinuousEngine(model, text, EOT_ID, slots=6)
    noise = [_rows(tiny, p, Sampling(max_tokens=9, temperature=1.0), seed=s) for s, p in enumerate(PROMPTS[1:4])]
    mine, outs = _rows(tiny, PROMPTS[0], sampling, n=2, seed=7)
    _drive(engine, {0: noise[0][0], 1: noise[1][0], 3: mine, 5: noise[2][0]})
    assert [o.text for o in outs] == [o.text for o in alone]
    assert outs[0].text != outs[1].text  # the two choices draw from one generator in turn


def test_stop_sequences_logprobs_echo_and_streaming_across_joins(tiny):
    model, _, text = tiny
    base = _alone_static(tiny, PROMPTS[1], Sampling(max_tokens=30, temperature=0))[0].text
    stop = base[8:11]
    assert stop and base.find(stop) >= 0
    sampling = Sampling(max_tokens=30, temperature=0, stop=(stop, "\ufffd\ufffd"), logprobs=2, echo=True)
    alone = _alone_static(tiny, PROMPTS[1], sampling)[0]
    engine = ContinuousEngine(model, text, EOT_ID, slots=4)
    mine, outs = _rows(tiny, PROMPTS[1], sampling)
    others = [_rows(tiny, p, Sampling(max_tokens=25, temperature=0)) for p in PROMPTS[2:4]]
    _drive(engine, {0: others[0][0], 2: mine, 3: others[1][0]})
    out = outs[0]
    assert out.text == alone.text == PROMPTS[1] + base[:base.find(stop)] and out.finish == "stop"
    assert [d.text for d in out.deltas] == [d.text for d in alone.deltas]  # the same held-back deltas
    assert all(stop not in d.text for d in out.deltas[1:])
    got = [(e.text, e.offset, e.top) for d in out.deltas for e in d.logprobs]
    want = [(e.text, e.offset, e.top) for d in alone.deltas for e in d.logprobs]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    lp = [e.logprob for d in out.deltas for e in d.logprobs]
    lw = [e.logprob for d in alone.deltas for e in d.logprobs]
    assert lp[0] is None and lw[0] is None and lp[1:] == pytest.approx(lw[1:], abs=1e-4)


def test_a_cancelled_row_frees_its_slot_at_the_next_step(tiny):
    model, _, text = tiny
    engine = ContinuousEngine(model, text, EOT_ID, slots=2)
    a, a_out = _rows(tiny, PROMPTS[0], Sampling(max_tokens=40, temperature=0))
    b, b_out = _rows(tiny, PROMPTS[2], Sampling(max_tokens=40, temperature=0))
    c, c_out = _rows(tiny, PROMPTS[3], Sampling(max_tokens=5, temperature=0))
    engine.step(a + b)
    engine.step()
    assert engine.running() == 2 and engine.free_slots() == 0
    sent = len(a_out[0].deltas)
    a[0].cancelled = True
    engine.step(c)  # a leaves before anything else happens, and c takes its slot at once
    assert engine.slots[0] is not None and engine.slots[0].state.row is c[0]
    assert len(a_out[0].deltas) == sent and a_out[0].finish is None  # nothing more is sent for it
    _drive(engine, {})
    assert c_out[0].finish == "length" and b_out[0].finish == "length" and engine.running() == 0


def test_a_failing_row_fails_its_request_alone(tiny):
    model, _, text = tiny
    engine = ContinuousEngine(model, text, EOT_ID, slots=4)
    good, good_out = _rows(tiny, PROMPTS[0], Sampling(max_tokens=10, temperature=0))
    bad, bad_out = _rows(tiny, PROMPTS[1], Sampling(max_tokens=10, temperature=0))
    calls = []

    def explode(delta):
        calls.append(delta)
        if len(calls) == 3:
            raise RuntimeError("the listener broke")
    bad[0].emit = explode
    _drive(engine, {0: good, 1: bad})
    assert [str(e) for e in bad_out[0].failures] == ["the listener broke"]
    assert good_out[0].text == _alone_static(tiny, PROMPTS[0], Sampling(max_tokens=10, temperature=0))[0].text


def test_the_batcher_joins_requests_while_others_run_and_refuses_a_full_queue(tiny):
    model, _, text = tiny
    cfg = ServeConfig(batching="continuous", max_batch_size=2, max_queued_rows=3, max_step_tokens=64)
    batcher = ContinuousBatcher(lambda m: ContinuousEngine(m, text, EOT_ID, slots=2), cfg)
    try:
        done = []
        works = []
        for p, m in zip(PROMPTS, (50, 4, 4, 4)):
            rows, outs = _rows(tiny, p, Sampling(max_tokens=m, temperature=0))
            finished = threading.Event()
            rows[0].emit = lambda d, o=outs[0], f=finished: (o.deltas.append(d), d.finish_reason and f.set())
            works.append((Work(rows, model, outs[0].failures.append), outs[0], finished))
        with batcher._cond:  # queue all four before the loop looks, so the limit is tested exactly
            for work, _, _ in works[:3]:
                batcher.submit(work)
            with pytest.raises(Overloaded) as refused:
                batcher.submit(works[3][0])
        assert refused.value.retry_after_s == 1
        for work, out, finished in works[:3]:
            assert finished.wait(60), out.failures
            done.append(time.monotonic())
        # the short ones ran beside the long one (2 slots): they did not wait for its 50 tokens
        assert works[1][1].finish == "length" and works[0][1].finish == "length"
        assert all(w.started_at is not None for w, _, _ in works[:3])
    finally:
        batcher.stop()


# ----------------------------------------------------------------------------- behind real HTTP

CFG = ServeConfig(batching="continuous", max_tokens_cap=16, max_batch_size=4, max_choices=4, max_queued_rows=64,
                  poll_interval_s=0, max_prompt_chars=200)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    from pipelines import http_app
    from pipelines.model_loading import FolderLoader

    folder = tmp_path_factory.mktemp("continuous") / "candidate"
    loader = FolderLoader(str(folder), "tiny:v1", make_candidate(folder))
    engine = http_app.Engine(loader, CFG, "cpu", "local")
    try:
        with uvicorn_server(http_app.standalone_app(engine)) as url:
            yield url, engine
    finally:
        engine.stop()


def _post(url, body, **kwargs):
    return requests.post(f"{url}/v1/completions", json=body, timeout=60, **kwargs)


def test_the_endpoint_answers_and_streams_with_continuous_batching(endpoint):
    url, engine = endpoint
    assert type(engine.batcher).__name__ == "ContinuousBatcher"
    bodies = [{"prompt": "def add(a, b):\n", "max_tokens": m, "temperature": 0} for m in (2, 16, 5, 11, 16, 3)]
    alone = [_post(url, b).json()["choices"][0]["text"] for b in bodies]
    answers = [None] * len(bodies)

    def call(i):
        answers[i] = _post(url, bodies[i])
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert [a.json()["choices"][0]["text"] for a in answers] == alone
    with _post(url, {**bodies[1], "stream": True, "n": 2, "seed": 3, "temperature": 1.0}, stream=True) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = {0: "", 1: ""}
    for e in events:
        streamed[e["choices"][0]["index"]] += e["choices"][0]["text"]
    whole = _post(url, {**bodies[1], "n": 2, "seed": 3, "temperature": 1.0}).json()["choices"]
    assert [streamed[0], streamed[1]] == [c["text"] for c in whole]
    assert engine.batcher.running_rows() == 0
