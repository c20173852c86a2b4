"""Tests for chat fine-tuning: the ChatML template (components/chat.py), conversations tokenized with an
assistant-only mask (components/sft.py), the data stage in chat format, and the template in model folders."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from components.chat import (CHAT_TOKENS, CHATML_TEMPLATE, ChatError, check_messages, load_chat_template,
                             render_for_training, render_prompt, save_chat_template)
from components.config import DataConfig, FinetuneConfig, TokenizerConfig
from components.data import prepare_data
from components.sft import (CHAT_REQUEST, Conversation, add_chat_tokens, extract_conversations, grow_vocab,
                            tokenize_conversations)
from components.sources import DataError
from components.tokenizer import train_tokenizer
from tests.corpora import sample_text, write_py_corpus, write_text_corpus

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "20"},
]


@pytest.fixture(scope="module")
def bpe():
    tokenizer = train_tokenizer([sample_text(i) for i in range(4)] + ["Add 2 and 3. And times 4? Be brief."], 300)
    add_chat_tokens(tokenizer)
    return tokenizer


def _hf_tokenizer(bpe, template):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template=template)


def test_rendering_matches_transformers(bpe):
    # A second, Llama-like template (loop variables, raise_exception): the prefix-diff marking is not ChatML-only.
    other = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
             "{{ raise_exception('bad role') }}{% endif %}{% if loop.first %}<s>{% endif %}"
             "[{{ m['role'] | upper }}] {{ m['content'] | trim }}\n{% endfor %}"
             "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")
    for template in (CHATML_TEMPLATE, other):
        hf = _hf_tokenizer(bpe, template)
        for n in (1, 2, 4):
            assert render_prompt(TWO_TURNS[:n], template) == hf.apply_chat_template(
                TWO_TURNS[:n], tokenize=False, add_generation_prompt=True)
        whole = hf.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=False)
        assert "".join(text for text, _ in render_for_training(TWO_TURNS, template)) == whole
    assert render_prompt(TWO_TURNS[1:2], CHATML_TEMPLATE) == "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_only_segments_and_mask(bpe):
    assert render_for_training(TWO_TURNS, CHATML_TEMPLATE) == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
        ("<|im_start|>user\nAdd 2 and 3.<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False), ("5<|im_end|>", True), ("\n", False),
        ("<|im_start|>user\nAnd times 4?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False), ("20<|im_end|>", True), ("\n", False),
    ]
    tokens, mask, counts = tokenize_conversations([Conversation(tuple(TWO_TURNS), "c")], bpe, 128, CHATML_TEMPLATE)
    assert counts == {"truncated": 0, "dropped": 0} and tokens.shape == mask.shape == (1, 129)
    ids = tokens[0].tolist()
    start, end = (bpe.token_to_id(t) for t in CHAT_TOKENS)
    # Hand-checked: targets are exactly "5<|im_end|>" and "20<|im_end|>", headers and turns of others are not.
    runs, run = [], []
    for i, m in zip(ids, mask[0]):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    assert [bpe.decode(r, skip_special_tokens=False) for r in runs] == ["5<|im_end|>", "20<|im_end|>"]
    assert [r[-1] for r in runs] == [end, end]
    assert ids.count(start) == 5 and ids.count(end) == 5  # special tokens are single ids
    # The prompt a server renders tokenizes to the row's prefix up to the first target.
    prompt = bpe.encode(render_prompt(TWO_TURNS[:2], CHATML_TEMPLATE), add_special_tokens=False).ids
    assert ids[:len(prompt)] == prompt and mask[0][len(prompt)] == 1 and not mask[0][:len(prompt)].any()


def test_chat_tokens_appended_after_the_trained_vocabulary():
    tokenizer = train_tokenizer([sample_text(1)], 280)
    size = tokenizer.get_vocab_size()
    assert add_chat_tokens(tokenizer) == (size, size + 1)
    assert add_chat_tokens(tokenizer) == (size, size + 1) and tokenizer.get_vocab_size() == size + 2  # idempotent


def test_truncation_and_drops_are_counted(bpe):
    long_answer = Conversation(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "x " * 200}), "a")
    long_question = Conversation(({"role": "user", "content": "y " * 200}, {"role": "assistant", "content": "ok"}), "b")
    fits = Conversation(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}), "c")
    tokens, mask, counts = tokenize_conversations([long_answer, long_question, fits], bpe, 32, CHATML_TEMPLATE)
    assert counts == {"truncated": 1, "dropped": 1}
    assert tokens.shape == (2, 33)
    assert mask[0][-1] == 1 and mask[0][:5].sum() == 0  # the kept start: header, then the cut answer
    with pytest.raises(ChatError, match="not prefix-stable"):  # a template that rewrites earlier turns
        render_for_training(TWO_TURNS, "{% for m in messages %}{{ m['content'] if loop.last else '' }}{% endfor %}")


def test_bad_rows_are_named(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    cases = [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
         r"chat.jsonl:3: messages\[1\].role='bot': must be one of system, user, assistant"),
        ({"messages": [{"role": "user", "content": 3}]}, r"chat.jsonl:3: messages\[0\].content must be a string"),
        ({"prompt": "q"}, r"chat.jsonl:3: no 'messages' field"),
        ({"messages": [{"role": "user", "content": "q"}]}, r"chat.jsonl:3: messages has no assistant turn"),
        ({"messages": "hello"}, r"chat.jsonl:3: messages must be a list"),
    ]
    path = tmp_path / "chat.jsonl"
    for bad, message in cases:
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")  # the bad one on line 3
        with pytest.raises(DataError, match=message):
            extract_conversations(str(path))
    table = pa.table({"messages": [good["messages"], [{"role": "user", "content": "q"}, {"role": "tool", "content": "a"}]]})
    pq.write_table(table, tmp_path / "chat.parquet")
    with pytest.raises(DataError, match=r"chat.parquet:row 2: messages\[1\].role='tool'"):
        extract_conversations(str(tmp_path / "chat.parquet"))
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        (tmp_path / "chat.txt").write_text("x")
        extract_conversations(str(tmp_path / "chat.txt"))
    with pytest.raises(ChatError, match=r"request: messages\[0\] must be an object"):
        check_messages(["hi"], "request")


def test_parquet_and_python_sources(tmp_path):
    rows = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(3)]
    pq.write_table(pa.table({"messages": rows}), tmp_path / "c.parquet")
    convs = extract_conversations(str(tmp_path / "c.parquet"))
    assert [c.messages[1]["content"] for c in convs] == ["a0", "a1", "a2"] and convs[0].doc_id == "c.parquet:row 1"
    convs = extract_conversations(str(write_py_corpus(tmp_path / "py")), max_pairs=5)
    assert len(convs) == 5
    user, assistant = convs[0].messages
    assert user["content"].startswith(CHAT_REQUEST + "def f") and '"""Return x plus' in user["content"]
    assert assistant["content"].startswith("    y = x + ")


def _model_folder(folder: Path, bpe, vocab_size: int) -> None:
    from components.model import GPT, GPTConfig, save_model

    torch.manual_seed(0)
    save_model(GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16)), str(folder))
    bpe.save(str(folder / "tokenizer.json"))


def test_template_survives_save_load_candidate_export_and_import(tmp_path, bpe):
    from transformers import AutoTokenizer

    from components.files import verify_checksums, write_checksums
    from components.hf_gpt2 import export_hf, import_hf
    from components.quantize import CANDIDATE_FILES, quantize_model

    model = tmp_path / "model"
    _model_folder(model, bpe, bpe.get_vocab_size())
    assert load_chat_template(str(model)) is None
    save_chat_template(str(model), CHATML_TEMPLATE)
    assert load_chat_template(str(model)) == CHATML_TEMPLATE

    candidate = tmp_path / "candidate"
    quantize_model(str(model), "fp32", str(candidate))
    verify_checksums(candidate, CANDIDATE_FILES, write_checksums(candidate))
    assert load_chat_template(str(candidate)) == CHATML_TEMPLATE
    export_hf(candidate, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.chat_template == CHATML_TEMPLATE
    prompt = hf.apply_chat_template(TWO_TURNS[:2], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert list(prompt["input_ids"]) == bpe.encode(render_prompt(TWO_TURNS[:2], CHATML_TEMPLATE), add_special_tokens=False).ids
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert load_chat_template(str(tmp_path / "back")) == CHATML_TEMPLATE

    plain = tmp_path / "plain"  # no template: the candidate has the file without one, export writes none
    _model_folder(plain, bpe, bpe.get_vocab_size())
    quantize_model(str(plain), "fp32", str(tmp_path / "plain-candidate"))
    assert load_chat_template(str(tmp_path / "plain-candidate")) is None
    export_hf(plain, tmp_path / "plain-hf")
    assert "chat_template" not in json.loads((tmp_path / "plain-hf" / "tokenizer_config.json").read_text())
    with pytest.raises(ChatError, match="does not compile"):
        save_chat_template(str(model), "{% for %}")


def test_grow_vocab_keeps_the_old_tokens_logits(bpe):
    from components.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=16)).eval()
    x = torch.randint(0, 100, (1, 8))
    before = model(x)[0]
    grow_vocab(model, 102)
    after = model(torch.cat([x, torch.tensor([[100, 101]])], dim=1))[0]
    assert model.config.vocab_size == 102 and model.lm_head.weight is model.transformer.wte.weight
    assert torch.allclose(after[0, :8, :100], before[0], atol=1e-5)


@pytest.fixture
def chat_data(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus")
    sections = (DataConfig(source=str(corpus), block_size=160, val_fraction=0.2), TokenizerConfig(vocab_size=300),
                FinetuneConfig(source=str(write_py_corpus(tmp_path / "py")), heldout_fraction=0.3, format="chat"))
    return prepare_data(str(tmp_path / "out"), *sections), sections


def test_data_stage_in_chat_format(tmp_path, chat_data):
    from tokenizers import Tokenizer

    data, sections = chat_data
    tokenizer = Tokenizer.from_file(data.tokenizer_uri)
    start, end = (tokenizer.token_to_id(t) for t in CHAT_TOKENS)
    assert (start, end) == (data.vocab_size - 2, data.vocab_size - 1)  # after the trained vocabulary
    assert load_chat_template(data.root) == CHATML_TEMPLATE
    manifest = json.loads(Path(data.manifest_uri).read_text())
    assert manifest["vocab_size"] == data.vocab_size
    assert {"sft_conversations_truncated", "sft_conversations_dropped"} <= set(data.stats)
    assert data.stats["sft_train_pairs"] + data.stats["sft_heldout_pairs"] + data.stats[
        "sft_conversations_dropped"] == data.stats["sft_pairs_extracted"]
    train = pq.read_table(data.sft_train_uri)
    pretrain_ids = np.concatenate(pq.read_table(data.train_uri).column("tokens").to_numpy(zero_copy_only=False))
    assert pretrain_ids.max() < start  # pretraining rows never hold the chat ids
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False).ids
    for ids, mask in zip(train.column("tokens").to_pylist(), train.column("mask").to_pylist()):
        first = mask.index(1)
        assert ids[first - len(header):first] == header  # targets begin right after the assistant header
        assert ids[:first].count(start) == 2  # user turn and assistant header: neither is a target
        target = tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        assert target.lstrip().startswith("y = x + ") and "<|im_start|>" not in target
        assert target.endswith("<|im_end|>") or len(ids) == 161 and mask[-1] == 1  # closed, or cut at the block

    # The same stage in pairs format drops the template and the chat tokens again.
    pairs = prepare_data(str(tmp_path / "out"), sections[0], sections[1], FinetuneConfig(source=sections[2].source,
                                                                                         heldout_fraction=0.3))
    assert load_chat_template(pairs.root) is None and pairs.vocab_size == data.vocab_size - 2
    assert pairs.fingerprint != data.fingerprint


def test_finetuning_on_chat_rows_runs(tmp_path, chat_data):
    from components import checkpoint as ckpt
    from components.model import GPT, GPTConfig, save_model
    from components.recipe import Feed, RunHooks, TrainPlan, run

    data, _ = chat_data
    shape = GPTConfig(block_size=160, vocab_size=data.vocab_size, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    save_model(GPT(shape), str(tmp_path / "base"))
    rows = pq.read_table(data.sft_train_uri)
    tokens = np.array(rows.column("tokens").to_pylist())
    mask = np.array(rows.column("mask").to_pylist())

    def train_epoch(epoch: int, seed: int):
        for i in range(0, len(tokens) - 3, 4):
            yield {"tokens": tokens[i:i + 4], "mask": mask[i:i + 4]}

    logs, store = {}, tmp_path / "store"

    def report(metrics: dict, folder: str | None) -> None:
        if folder is not None:
            shutil.copytree(folder, store / f"checkpoint_{metrics['step']:06d}")

    section = FinetuneConfig(max_steps=4, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1, eval_every=0,
                             checkpoint_every=4, seed=0, precision="fp32", method="full", format="chat")
    plan = TrainPlan(section, shape, init_from=str(tmp_path / "base"),
                     extra_files=(data.tokenizer_uri, os.path.join(data.root, "tokenizer_config.json")))
    run(plan, Feed(train_epoch, None), RunHooks(log=lambda m, step: logs.setdefault(step, {}).update(m),
                                                log_params=lambda p: None, started=lambda s: None, report=report),
        torch.device("cpu"))
    losses = [m["train/loss"] for m in logs.values() if "train/loss" in m]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert load_chat_template(str(ckpt.newest(ckpt.find_under(str(store)))[0])) == CHATML_TEMPLATE
