"""gptforge models under lm-evaluation-harness: the adapter's numbers by hand, and the shipped task.

The task ("which body belongs to this function", 4 choices, chance 25%) is built here from the
standard library's documented functions; lm-eval runs it from a local JSON file, offline. The
scale a real model reaches on a real benchmark: GPT-2 124M scores about 31% acc_norm on HellaSwag
in lm-eval (chance 25%).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from components.config import EvaluateConfig
from components.eval_tasks import WHICH_BODY, WHICH_BODY_CHOICES, task_spec_problem, which_body_items, write_which_body
from components.experiment_file import ConfigError, load_config
from components.generation import generate
from components.lm_eval_model import GPTForgeLM, run_tasks
from components.model import GPT, IGNORE_INDEX, GPTConfig
from components.sft import extract_function_pairs
from components.tokenizer import EOT_ID, train_tokenizer

BLOCK = 64
ACC = f"eval/task/{WHICH_BODY}/acc"
ACC_NORM = f"eval/task/{WHICH_BODY}/acc_norm"


@pytest.fixture(scope="module")
def material():
    """(signature+docstring, body) pairs of ~250 KB of the stdlib and a byte-level BPE trained on them."""
    pairs = [(p.prompt, p.completion) for p in extract_function_pairs("stdlib", max_bytes=250_000)]
    tokenizer = train_tokenizer([c + b for c, b in pairs], vocab_size=512)
    return pairs, tokenizer


def _model(tokenizer, seed=0, block_size=BLOCK, n_embd=32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                         n_embd=n_embd)).eval()


def _requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# ----------------------------------------------------------------------------- the adapter, by hand


def _by_hand(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """The continuation's log-probability from one forward pass over the last block_size + 1 tokens.

    As lm-eval encodes a pair: the context's trailing whitespace is scored with the continuation."""
    context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
    context_ids = tokenizer.encode(context, add_special_tokens=False).ids
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    n = len(whole) - len(context_ids)
    window = whole[-(model.config.block_size + 1):]
    logits, _ = model(torch.tensor([window[:-1]]))  # (1, T, V)
    logprobs = F.log_softmax(logits[0, -n:].float(), dim=-1)  # (n, V)
    target = torch.tensor(window[-n:])
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


@torch.no_grad()
def test_loglikelihood_is_the_continuations_log_probability_from_the_forward_pass(material):
    pairs, tokenizer = material
    model = _model(tokenizer)
    (c0, b0), (c1, b1) = pairs[0], pairs[1]
    long_context = "".join(c for c, _ in pairs[:20])  # hundreds of tokens: cut from the left
    assert len(tokenizer.encode(long_context).ids) > 3 * BLOCK
    asked = [(c0, b0[:40]), ("def f(x):\n", "    return x\n"), (long_context, b1[:30]), (c1, b1[:5])]
    got = GPTForgeLM(model, tokenizer, batch_size=3).loglikelihood(_requests("loglikelihood", *asked))
    assert [type(g) for g in got] == [tuple] * 4 and all(type(lp) is float and type(gr) is bool for lp, gr in got)
    for (context, continuation), (logprob, greedy) in zip(asked, got):  # in the order asked, whatever the batching
        want, want_greedy = _by_hand(model, tokenizer, context, continuation)
        assert logprob == pytest.approx(want, abs=1e-4) and greedy == want_greedy


@torch.no_grad()
def test_is_greedy_is_true_exactly_when_argmax_decoding_gives_the_continuation(material):
    _, tokenizer = material
    model = _model(tokenizer)
    prompt = "def add(a, b):"  # no trailing whitespace: lm-eval would move it into the continuation
    ids = tokenizer.encode(prompt).ids
    out = generate(model, torch.tensor([ids]), 6, temperature=0.0)[0, len(ids):].tolist()
    greedy_text = tokenizer.decode(out)
    assert tokenizer.encode(prompt + greedy_text).ids == ids + out, "the text must encode back to the same tokens"
    lm = GPTForgeLM(model, tokenizer)
    ((_, greedy),) = lm.loglikelihood(_requests("loglikelihood", (prompt, greedy_text)))
    other = tokenizer.decode([(out[0] + 1) % tokenizer.get_vocab_size()] + out[1:])
    ((_, not_greedy),) = lm.loglikelihood(_requests("loglikelihood", (prompt, other)))
    assert greedy and not not_greedy


@torch.no_grad()
def test_rolling_loglikelihood_of_a_short_text_is_its_full_sequence_loss(material):
    pairs, tokenizer = material
    model = _model(tokenizer)
    text = pairs[3][1][:60]
    ids = tokenizer.encode(text).ids
    assert 5 < len(ids) < BLOCK
    x = torch.tensor([[EOT_ID] + ids[:-1]])  # the text after end-of-text, as a document starts
    _, loss = model(x, torch.tensor([ids]))  # mean over the len(ids) targets
    (rolling,) = GPTForgeLM(model, tokenizer).loglikelihood_rolling(_requests("loglikelihood_rolling", (text,)))
    assert type(rolling) is float and rolling == pytest.approx(-float(loss) * len(ids), rel=1e-5)


@torch.no_grad()
def test_rolling_windows_score_every_token_of_a_long_text_once(material):
    """With the output layer at zero every token costs exactly log(V), so the sum counts the scored tokens."""
    pairs, tokenizer = material
    model = _model(tokenizer)
    model.lm_head.weight.zero_()  # tied with the embedding: uniform logits at every position
    text = "".join(b for _, b in pairs[:10])
    n = len(tokenizer.encode(text).ids)
    assert n > 3 * BLOCK
    (rolling,) = GPTForgeLM(model, tokenizer).loglikelihood_rolling(_requests("loglikelihood_rolling", (text,)))
    assert rolling == pytest.approx(-n * math.log(tokenizer.get_vocab_size()), rel=1e-6)


@torch.no_grad()
def test_generate_until_is_greedy_and_stops_before_the_first_until_string(material):
    _, tokenizer = material
    model = _model(tokenizer, seed=3)
    prompt = "class Stack:\n    def push(self, item):\n"
    ids = tokenizer.encode(prompt).ids
    out = generate(model, torch.tensor([ids]), 40, temperature=0.0)[0, len(ids):].tolist()
    assert EOT_ID not in out, "pick another seed: this one ends the text early"
    full = tokenizer.decode(out)
    stop = tokenizer.decode(out[20:22])  # two tokens past the first chunk of 16
    assert stop and stop in full
    lm = GPTForgeLM(model, tokenizer)
    got = lm.generate_until(_requests("generate_until", (prompt, {"until": [stop], "max_gen_toks": 64}),
                                      (prompt, {"until": ["\x00never"], "max_gen_toks": 7})))
    assert got == [full.split(stop)[0], tokenizer.decode(out[:7])]


# ----------------------------------------------------------------------------- the shipped task


def test_items_hold_the_true_body_among_other_bodies_of_the_same_indentation(material):
    pairs, _ = material
    items = which_body_items(pairs)
    bodies = dict(pairs)
    assert len(items) > 300 and items == which_body_items(list(reversed(pairs)))  # the same items, any order
    for item in items:
        choices = item["choices"]
        assert len(set(choices)) == WHICH_BODY_CHOICES and choices[item["label"]] == bodies[item["context"]]
    labels = [item["label"] for item in items]
    assert all(labels.count(k) > len(items) / 8 for k in range(WHICH_BODY_CHOICES))  # the answer moves about
    methods = [item for item in items if _indent(bodies[item["context"]]) == " " * 8]
    assert len(methods) > 50 and all(_indent(c) == " " * 8 for item in methods for c in item["choices"])


def _indent(body: str) -> str:
    first = next(line for line in body.split("\n") if line.strip())
    return first[: len(first) - len(first.lstrip())]


def test_a_random_model_scores_near_chance(material, tmp_path):
    """Over 400 items a chance scorer lands within 0.08 of 1/4 (more than 3.5 standard errors of 0.022)."""
    pairs, tokenizer = material
    metrics = run_tasks(GPTForgeLM(_model(tokenizer), tokenizer, batch_size=32), [write_which_body(pairs, tmp_path)],
                        limit=400)
    assert metrics[f"eval/task/{WHICH_BODY}/items"] == 400
    assert sorted(metrics) == sorted(f"eval/task/{WHICH_BODY}/{m}" for m in
                                     ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "items"))
    chance = 1 / WHICH_BODY_CHOICES
    assert abs(metrics[ACC] - chance) < 0.08 and abs(metrics[ACC_NORM] - chance) < 0.08


def test_a_model_trained_on_the_tasks_own_functions_scores_well_above_chance(material, tmp_path):
    """100 steps on the first 24 items' functions (7 s on an idle 2-core CPU; 50 steps already reach
    acc_norm 0.96, 30 steps 0.67); their distractors are other functions' bodies, which it has not seen."""
    pairs, tokenizer = material
    n_items, block = 24, 128
    items = which_body_items(pairs)[:n_items]  # the file's first items: what limit=n_items scores
    rows = []
    for item in items:
        ids = tokenizer.encode(item["context"] + item["choices"][item["label"]]).ids
        rows += [ids[max(0, end - block - 1):end] for end in range(len(ids), 1, -block)]
    width = max(len(r) for r in rows)
    x = torch.tensor([r[:-1] + [EOT_ID] * (width - len(r)) for r in rows])  # (N, T)
    y = torch.tensor([r[1:] + [IGNORE_INDEX] * (width - len(r)) for r in rows])  # (N, T)
    model = _model(tokenizer, block_size=block, n_embd=64).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = run_tasks(GPTForgeLM(model.eval(), tokenizer), [write_which_body(pairs, tmp_path)], limit=n_items)
    assert metrics[f"eval/task/{WHICH_BODY}/items"] == n_items
    assert metrics[ACC_NORM] >= 0.75 and metrics[ACC] >= 0.6, metrics


def test_a_users_local_generation_task_runs_from_its_yaml(material, tmp_path):
    """Any local lm-eval task YAML is a task: here one that generates, scored by exact match."""
    _, tokenizer = material
    model = _model(tokenizer, seed=3)
    prompts = ["def add(a, b):\n", "import os\n", "class Stack:\n"]
    answers = []
    for p in prompts:
        ids = tokenizer.encode(p).ids
        out = generate(model, torch.tensor([ids]), 8, temperature=0.0, eos_id=EOT_ID)[0, len(ids):].tolist()
        answers.append(tokenizer.decode([t for t in out if t != EOT_ID]))
    answers[2] = "something else"  # 2 of 3 right
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"q": p, "a": a}) + "\n" for p, a in zip(prompts, answers)))
    (tmp_path / "gen.yaml").write_text(f"""\
task: my_generation
dataset_path: json
dataset_kwargs: {{data_files: {{test: {tmp_path / 'gen.jsonl'}}}, cache_dir: {tmp_path / 'cache'}}}
test_split: test
output_type: generate_until
doc_to_text: q
doc_to_target: a
target_delimiter: ""
generation_kwargs: {{until: ["\\x00never"], max_gen_toks: 8}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
""")
    metrics = run_tasks(GPTForgeLM(model, tokenizer), [str(tmp_path / "gen.yaml")], limit=None)
    assert metrics["eval/task/my_generation/exact_match"] == pytest.approx(2 / 3)


def test_the_default_evaluation_runs_the_shipped_task_on_a_few_items_and_a_missing_yaml_is_named():
    cfg = EvaluateConfig()
    assert cfg.tasks == [WHICH_BODY] and cfg.task_limit == 256
    assert task_spec_problem(WHICH_BODY) is None and task_spec_problem("hellaswag") is None
    with pytest.raises(ConfigError, match=r"evaluate.tasks: '/nowhere/task.yaml': no such task file"):
        load_config(None, ["evaluate.tasks=[/nowhere/task.yaml]"])


@pytest.mark.slow  # builds lm-eval's index of its ~15,000 tasks: 10-15 s
def test_a_task_name_lm_eval_does_not_know_is_a_config_error(material):
    _, tokenizer = material
    with pytest.raises(ConfigError, match=r"evaluate.tasks: 'no_such_task_xyz' not among lm-eval's tasks"):
        run_tasks(GPTForgeLM(_model(tokenizer), tokenizer), ["no_such_task_xyz"], limit=4)


def test_too_few_held_out_functions_for_an_item_is_counted_not_an_error(tmp_path):
    # One held-out pair cannot make a 4-way item: the models of such a run are all without the task alike.
    from components.lm_eval_model import task_metrics
    from tests.helpers import heldout_data

    data = heldout_data(tmp_path / "data")
    tokenizer = train_tokenizer(["def add(a, b):\n"] * 20, vocab_size=300)
    model = GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=1, n_head=2, n_embd=16)).eval()
    assert task_metrics(model, tokenizer, data, EvaluateConfig()) == {f"eval/task/{WHICH_BODY}/items": 0.0}
