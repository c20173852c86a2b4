"""Generation in one process: `generate` (cropping, eos, the KV cache against none) and the endpoint's
batches (padding, sampling settings, stop, logprobs, healing)."""
import threading
import time

import pytest
import torch

from components.batching import Batcher, Overloaded, Work
from components.config import ServeConfig
from components.rows import Row, Sampling, TokenText, _safe_length
from components.generation import batch_fits, generate, generate_batch
from components.model import GPT, GPTConfig
from components.sampling import MIN_TEMPERATURE, MIN_TOP_P
from components.tokenizer import EOT_ID, train_tokenizer


@pytest.fixture
def one_thread():
    """Tiny matmuls run fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n", "x = [1, 2, 3]\nprint(x)\n"] * 20,
                                vocab_size=300)
    model = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=32)).eval()
    return model, tokenizer, TokenText(tokenizer, 300)


@pytest.fixture
def short_model() -> GPT:
    """block_size 16: a few new tokens run past the context."""
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)).eval()


def _run(tiny, prompts, sampling, seed=None):
    """Generate `prompts` in one batch; returns [(text, finish_reason, deltas)] per prompt."""
    model, tokenizer, text = tiny
    deltas = [[] for _ in prompts]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    rows = [Row(tokenizer.encode(p).ids, p, sampling, deltas[i].append, gen) for i, p in enumerate(prompts)]
    generate_batch(model, text, rows, EOT_ID)
    return [("".join(d.text for d in ds), ds[-1].finish_reason, ds) for ds in deltas]


# ----------------------------------------------------------------------------- generate


def test_generate(short_model):
    idx = torch.randint(0, 64, (2, 3))
    out = generate(short_model, idx, 5, temperature=0)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], idx)
    assert torch.equal(out, generate(short_model, idx, 5, temperature=0))  # greedy is deterministic
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = generate(short_model, idx, 5, temperature=1.0, top_k=5, generator=g1)
    assert torch.equal(a, generate(short_model, idx, 5, temperature=1.0, top_k=5, generator=g2))
    # longer than block_size: the context is cropped
    assert generate(short_model, idx, 20, temperature=0).shape == (2, 23)


def test_generate_stops_at_eos(short_model):
    idx = torch.randint(0, 64, (2, 3))
    greedy = generate(short_model, idx, 1, temperature=0)[:, -1]
    eos = int(greedy[0])
    if int(greedy[1]) == eos:  # both rows stop after one step
        assert generate(short_model, idx, 5, temperature=0, eos_id=eos).shape == (2, 4)
    out = generate(short_model, idx, 5, temperature=0, eos_id=eos)
    assert (out[0, 3:] == eos).all()  # row 0 finished and is padded with eos


@pytest.mark.parametrize("prompt_len, new_tokens", [(1, 10), (5, 11), (3, 30)])  # 30: runs past block_size 16
def test_greedy_generation_with_and_without_cache_is_equal(short_model, prompt_len, new_tokens):
    idx = torch.randint(0, 64, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    cached = generate(short_model, idx, new_tokens, temperature=0, use_cache=True)
    uncached = generate(short_model, idx, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (3, prompt_len + new_tokens)
    assert torch.equal(cached, uncached)


def test_sampling_with_and_without_cache_is_equal(short_model):
    idx = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(3))
    runs = [generate(short_model, idx, 12, temperature=1.0, top_k=8, use_cache=c,
                     generator=torch.Generator().manual_seed(7)) for c in (True, False)]
    assert torch.equal(*runs)


def test_on_token_sees_every_new_token(short_model):
    idx = torch.randint(0, 64, (2, 3))
    seen = []
    out = generate(short_model, idx, 6, temperature=0, on_token=seen.append)
    assert torch.equal(torch.cat(seen, dim=1), out[:, 3:])


# ----------------------------------------------------------------------------- the endpoint's batches


def test_left_padded_rows_compute_what_each_row_computes_alone(tiny):
    model = tiny[0]
    a = torch.randint(1, 300, (1, 9))
    b = torch.randint(1, 300, (1, 4))
    alone = [model(x, cache=model.new_cache(1))[0][0, -1] for x in (a, b)]
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], dim=1)])  # (2, 9), b left-padded
    cache = model.new_cache(2, pad=torch.tensor([0, 5]))
    logits, _ = model(batch, cache=cache)
    assert torch.allclose(logits[0, -1], alone[0], atol=1e-5) and torch.allclose(logits[1, -1], alone[1], atol=1e-5)
    step = torch.randint(1, 300, (2, 1))  # one decode step on the padded cache
    stepped, _ = model(step, cache=cache)
    for i, x in enumerate((a, b)):
        ref, _ = model(torch.cat([x, step[i : i + 1]], dim=1))
        assert torch.allclose(stepped[i, -1], ref[0, -1], atol=1e-5)


def test_a_batch_gives_each_prompt_what_it_gets_alone(tiny):
    prompts = ["def add(a, b):\n", "x", "print(x)\nx = [1, 2"]
    greedy = Sampling(max_tokens=12, temperature=0)
    together = _run(tiny, prompts, greedy)
    for prompt, got in zip(prompts, together):
        assert _run(tiny, [prompt], greedy)[0][:2] == got[:2]
    sampled = Sampling(max_tokens=12, temperature=0.9, top_k=40)
    assert _run(tiny, prompts[:1], sampled, seed=3)[0][0] == _run(tiny, prompts[:1], sampled, seed=3)[0][0]


def test_stop_cuts_the_text_before_the_first_stop_sequence(tiny):
    prompt = ["def add(a, b):\n"]
    full, reason, _ = _run(tiny, prompt, Sampling(max_tokens=40, temperature=0))[0]
    assert reason == "length" and len(full) > 4, full
    stop = full[3:5]
    text, reason, deltas = _run(tiny, prompt, Sampling(max_tokens=40, temperature=0, stop=("zzz", stop)))[0]
    assert reason == "stop" and text == full[: full.index(stop)]
    assert stop not in "".join(d.text for d in deltas)  # never sent, not even in a streamed piece


def test_text_that_may_start_a_stop_sequence_is_held_back():
    assert _safe_length("abc\n", ("\n\n",)) == 3
    assert _safe_length("abc", ("c d",)) == 2
    assert _safe_length("ab\ufffd", ()) == 2  # half of a UTF-8 character
    assert _safe_length("abc", ("x",)) == 3


def test_a_tiny_top_p_keeps_only_the_most_likely_token(tiny):
    greedy = _run(tiny, ["x = "], Sampling(max_tokens=10, temperature=0))[0][0]
    nucleus = _run(tiny, ["x = "], Sampling(max_tokens=10, temperature=1.0, top_p=1e-6), seed=1)[0][0]
    assert nucleus == greedy
    wide = {_run(tiny, ["x = "], Sampling(max_tokens=10, temperature=2.0), seed=s)[0][0] for s in range(4)}
    assert len(wide) > 1  # without the nucleus, sampling does vary


def test_logprobs_and_echo_cover_the_returned_text(tiny):
    prompt = "def add(a, b):\n"
    text, _, deltas = _run(tiny, [prompt], Sampling(max_tokens=8, temperature=0, logprobs=2))[0]
    entries = [e for d in deltas for e in d.logprobs]
    assert "".join(e.text for e in entries).startswith(text) and len(entries) == sum(d.completion_tokens for d in deltas)
    assert all(e.logprob <= 0 and len(e.top) == 2 for e in entries)
    assert [e.offset for e in entries] == sorted(e.offset for e in entries)

    echoed, _, deltas = _run(tiny, [prompt], Sampling(max_tokens=8, temperature=0, logprobs=1, echo=True))[0]
    assert echoed == prompt + text
    entries = [e for d in deltas for e in d.logprobs]
    assert entries[0].logprob is None and all(e.logprob is not None for e in entries[1:])
    joined = "".join(e.text for e in entries)
    assert joined.startswith(echoed)
    for e in entries:
        assert joined[e.offset : e.offset + len(e.text)] == e.text


def test_healing_keeps_the_prompt_text(tiny):
    # The last prompt token is taken back and regenerated: prompt + completion is still a continuation.
    model, tokenizer, vocab = tiny
    prompt = "def add(a, b):\n"
    text = _run(tiny, [prompt], Sampling(max_tokens=6, temperature=0))[0][0]
    ids = tokenizer.encode(prompt).ids
    allowed = vocab.starting_with(ids[-1])
    assert allowed[ids[-1]] and allowed.sum() >= 1
    assert all(vocab.raw[i].startswith(vocab.raw[ids[-1]]) for i in allowed.nonzero().flatten().tolist())
    assert isinstance(text, str)


def test_rows_that_do_not_fit_together_are_not_batched(tiny):
    rows = [Row([1] * 50, "", Sampling(max_tokens=10), print), Row([1] * 2, "", Sampling(max_tokens=30), print)]
    assert not batch_fits(rows, 64) and batch_fits(rows[:1], 64) and batch_fits(rows[1:], 64)


def test_the_batcher_runs_concurrent_work_together_and_refuses_a_full_queue():
    batches, release = [], threading.Event()

    def run(model, works):
        batches.append((model, [len(w.rows) for w in works]))
        release.wait(5)  # the first batch runs until the test lets it go

    cfg = ServeConfig(max_batch_size=4, batch_wait_timeout_s=0.2, max_queued_rows=5)
    batcher = Batcher(run, cfg, fits=lambda m, rows: True)
    try:
        failed = []
        batcher.submit(Work([1, 1], "m1", failed.append))
        _until(lambda: batches)
        batcher.submit(Work([1], "m1", failed.append))  # these three queue while the first batch runs
        batcher.submit(Work([1, 1], "m1", failed.append))
        batcher.submit(Work([1], "m2", failed.append))  # another model: never in the same batch
        assert batcher.queued_rows() == 4
        with pytest.raises(Overloaded):
            batcher.submit(Work([1, 1], "m1", failed.append))  # would make 6 > 5: refused at once
        release.set()
        _until(lambda: len(batches) == 3)
        assert batches == [("m1", [2]), ("m1", [1, 2]), ("m2", [1])] and not failed
    finally:
        release.set()
        batcher.stop()


def _until(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_failing_batch_fails_its_requests_and_the_loop_goes_on():
    calls = []

    def run(model, works):
        calls.append(model)
        if model == "bad":
            raise ValueError("boom")

    cfg = ServeConfig(max_batch_size=4, batch_wait_timeout_s=0.0, max_queued_rows=8)
    batcher = Batcher(run, cfg, fits=lambda m, rows: True)
    try:
        failed = []
        batcher.submit(Work([1], "bad", failed.append))
        deadline = time.monotonic() + 5
        while not failed and time.monotonic() < deadline:
            time.sleep(0.01)
        batcher.submit(Work([1], "good", failed.append))
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [str(e) for e in failed] == ["boom"] and calls == ["bad", "good"]
    finally:
        batcher.stop()


def test_healing_turns_the_readme_example_from_empty_into_code(one_thread):
    """The README's failure, reproduced: a lone "\\n" token is (in this corpus) only ever followed by end-of-text."""
    torch.manual_seed(0)
    doc = "def add(a, b):\n    return a + b\n"
    tokenizer = train_tokenizer([doc] * 50, vocab_size=300)
    ids = torch.tensor((tokenizer.encode(doc).ids + [EOT_ID]) * 40)
    model = GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):  # about a second of training on one thread
        starts = torch.randint(0, len(ids) - 33, (8,))
        rows = torch.stack([ids[s : s + 33] for s in starts.tolist()])  # (16, 33)
        _, loss = model(rows[:, :-1], rows[:, 1:].contiguous())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    prompt = "def add(a, b):\n"
    prompt_ids = tokenizer.encode(prompt).ids
    plain = generate(model, torch.tensor([prompt_ids]), 8, temperature=0, eos_id=EOT_ID)[0, len(prompt_ids):]
    assert plain[0] == EOT_ID  # without healing: end-of-text at once, an empty completion
    text, reason, _ = _run((model, tokenizer, TokenText(tokenizer, 300)), [prompt], Sampling(max_tokens=8, temperature=0))[0]
    assert text.startswith("    return a + b"), text


# ----------------------------------------------------------------------------- one row cannot fail another


def test_a_top_p_too_small_for_float32_still_keeps_the_most_likely_token():
    from components.rows import _sample

    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    for top_p in (1e-46, 0.0, MIN_TOP_P):  # 1e-46 is 0 in float32: every token was dropped and sampling raised
        token = _sample(logits, Sampling(temperature=1.0, top_p=top_p), torch.Generator().manual_seed(1))
        assert token == int(logits.argmax())


def test_the_smallest_temperature_samples_even_from_extreme_logits():
    # logits / MIN_TEMPERATURE stays finite for any logit a model gives (|logit| far below 1e35), so no larger floor.
    from components.rows import _sample

    logits = torch.linspace(-1e4, 1e4, 300)
    for s in (Sampling(temperature=MIN_TEMPERATURE), Sampling(temperature=MIN_TEMPERATURE, top_p=MIN_TOP_P, top_k=1)):
        assert _sample(logits, s, torch.Generator().manual_seed(0)) == 299


def _request_rows(tiny, prompt, sampling, n=1, ids=None):
    """`n` rows of one request (one shared `fail`); returns (rows, deltas per row, failures)."""
    _, tokenizer, _ = tiny
    deltas, failures = [[] for _ in range(n)], []
    ids = tokenizer.encode(prompt).ids if ids is None else ids
    rows = [Row(ids, prompt, sampling, deltas[i].append, torch.Generator().manual_seed(0), failures.append)
            for i in range(n)]
    return rows, deltas, failures


def test_a_row_whose_sampling_raises_fails_its_request_alone(tiny):
    greedy = Sampling(max_tokens=12, temperature=0)
    alone = _run(tiny, ["def add(a, b):\n"], greedy)[0]
    good, good_deltas, good_failures = _request_rows(tiny, "def add(a, b):\n", greedy)
    # top_k=0 is refused at the door; past it, torch.topk(k=0) raises inside the batch
    bad, bad_deltas, bad_failures = _request_rows(tiny, "x = ", Sampling(max_tokens=12, temperature=1.0, top_k=0), n=2)
    generate_batch(tiny[0], tiny[2], bad[:1] + good + bad[1:], EOT_ID)
    assert not good_failures and "".join(d.text for d in good_deltas[0]) == alone[0]
    assert good_deltas[0][-1].finish_reason == alone[1]
    assert len(bad_failures) == 1 and isinstance(bad_failures[0], IndexError)  # once, and both rows stopped
    assert bad_deltas == [[], []]


def test_a_prefill_that_raises_is_run_again_one_request_at_a_time(tiny):
    greedy = Sampling(max_tokens=8, temperature=0)
    alone = _run(tiny, ["print(x)\n"], greedy)[0][0]
    good, good_deltas, good_failures = _request_rows(tiny, "print(x)\n", greedy)
    bad, _, bad_failures = _request_rows(tiny, "?", greedy, ids=[10**6])  # no such token: the embedding raises
    generate_batch(tiny[0], tiny[2], good + bad, EOT_ID)
    assert not good_failures and "".join(d.text for d in good_deltas[0]) == alone
    assert len(bad_failures) == 1 and isinstance(bad_failures[0], IndexError)


def test_a_row_whose_listener_raises_does_not_stop_the_others(tiny):
    greedy = Sampling(max_tokens=8, temperature=0)
    good, good_deltas, good_failures = _request_rows(tiny, "x = [1", greedy)
    bad, _, bad_failures = _request_rows(tiny, "x = [1", greedy)

    def broken_emit(delta):
        raise RuntimeError("the client went away badly")

    bad[0].emit = broken_emit
    generate_batch(tiny[0], tiny[2], bad + good, EOT_ID)
    assert good_deltas[0][-1].finish_reason is not None and not good_failures
    assert [str(e) for e in bad_failures] == ["the client went away badly"]


def test_rows_without_a_fail_callback_raise_as_before(tiny):
    _, tokenizer, _ = tiny
    row = Row(tokenizer.encode("x").ids, "x", Sampling(temperature=1.0, top_k=0), lambda d: None)
    with pytest.raises(IndexError):
        generate_batch(tiny[0], tiny[2], [row], EOT_ID)


def test_generate_runs_on_the_endpoints_continuous_engine(tiny):
    """`generate` gives what the engine gives the same rows (greedy and seeded), in company too."""
    from components.continuous import ContinuousEngine

    model, tokenizer, text = tiny
    ids = tokenizer.encode("x = [1, 2").ids
    prompt = torch.tensor([ids, ids])
    greedy = generate(model, prompt, 12, temperature=0, eos_id=EOT_ID, text=text)
    sampled = generate(model, prompt, 12, temperature=0.9, top_k=20, eos_id=EOT_ID,
                       generator=torch.Generator().manual_seed(5))
    engine = ContinuousEngine(model, text, EOT_ID, slots=4)
    tokens: dict[int, list[int]] = {}
    engine.on_token = lambda row, token: tokens.setdefault(id(row), []).append(token)
    noise = Row(tokenizer.encode("def f").ids, "def f", Sampling(max_tokens=20, temperature=0), lambda d: None)
    gen = torch.Generator().manual_seed(5)
    rows = [Row(ids, "", Sampling(max_tokens=12, temperature=0, heal=False), lambda d: None)] + [
        Row(ids, "", Sampling(max_tokens=12, temperature=0.9, top_k=20, heal=False), lambda d: None, gen)
        for _ in range(2)]
    engine.step([noise])
    engine.step(rows)
    while engine.running():
        engine.step()
    got = [tokens[id(r)] for r in rows]
    want = [out[len(ids):].tolist() for out in (greedy[0], sampled[0], sampled[1])]
    assert [w[:len(g)] for g, w in zip(got, want)] == got  # generate pads a finished row with eos
    assert all(w[len(g):] == [EOT_ID] * (len(w) - len(g)) or g[-1] == EOT_ID for g, w in zip(got, want))


def test_a_long_prompt_prefills_in_chunks_beside_decoding_rows(tiny):
    """A prompt larger than the step's token budget joins at once and prefills over several steps,
    while the running row keeps decoding; both give their text alone."""
    from components.continuous import ContinuousEngine

    model, tokenizer, text = tiny
    long_prompt = "x = [1, 2, 3]\nprint(x)\ndef add(a, b):\n    return a + b\nx = [1, 2"
    alone = [_run(tiny, [p], Sampling(max_tokens=m, temperature=0))[0][0]
             for p, m in (("def f", 20), (long_prompt, 8))]
    engine = ContinuousEngine(model, text, EOT_ID, slots=2, max_step_tokens=4)
    outs = [[], []]
    first = Row(tokenizer.encode("def f").ids, "def f", Sampling(max_tokens=20, temperature=0), outs[0].append)
    second = Row(tokenizer.encode(long_prompt).ids, long_prompt, Sampling(max_tokens=8, temperature=0),
                 outs[1].append)
    assert len(second.prompt_ids) > 12
    engine.step([first])
    engine.step([second])
    decoded_while_prefilling = len(outs[0])
    engine.step()
    assert len(outs[0]) > decoded_while_prefilling and not outs[1]  # still prefilling, 3 tokens a step
    while engine.running():
        engine.step()
    assert ["".join(d.text for d in out) for out in outs] == alone
