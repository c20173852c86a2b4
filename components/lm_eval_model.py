"""gptforge models under EleutherAI's lm-evaluation-harness: the one module that talks to `lm_eval`.

`GPTForgeLM` wraps a GPT and its `tokenizers.Tokenizer` as an `lm_eval.api.model.LM`, so any
lm-eval task runs on it; `task_metrics` runs the tasks of `evaluate.tasks` (by default the
shipped "which body belongs to this function", components/eval_tasks) for one candidate and
returns them as `eval/task/<task>/<metric>`.

Everything runs offline: the shipped task's data is written to a temporary folder with its YAML,
and HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set while lm-eval loads tasks (the `datasets` and
`huggingface_hub` libraries read them when first imported, which happens here). A task named by
the user must then have its data in the local Hugging Face cache already.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from typing import Iterator

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F

from components import storage
from components.artifacts import TokenizedData
from components.bpb import heldout_pairs
from components.config import EvaluateConfig
from components.eval_tasks import WHICH_BODY, write_which_body
from components.experiment_file import ConfigError
from components.generation import generate
from components.tokenizer import EOT, eot_id

TASK_PREFIX = "eval/task/"
_GEN_CHUNK = 16  # tokens generated between checks for a stop sequence
_DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task does not say
_FEWSHOT_SEED = 1234  # simple_evaluate's default
_NOT_SCORES = ("alias", "sample_len")  # entries of lm-eval's results that are no score ("items" says how many)


class GPTForgeLM(TemplateLM):
    """A gptforge GPT as an lm-eval language model, on the device its weights are on.

    Text is encoded with `tokenizer` without special tokens; an empty context is the
    end-of-text token, as every document starts in pretraining. Inputs longer than the
    model's `block_size` are cut from the left.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, batch_size: int = 16):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eot = eot_id(tokenizer)  # 0 in gptforge's tokenizers, 50256 in GPT-2's
        self.batch_size = batch_size
        self.block_size = model.config.block_size
        self._device = model.transformer.wpe.weight.device  # never quantized, so always a plain tensor

    @property
    def eot_token_id(self) -> int:
        return self.eot

    @property
    def max_length(self) -> int:
        return self.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation tokens, whether greedy decoding gives them all).

        A continuation of up to `block_size` tokens is scored in one window after as much of its
        context as fits (left-cut, as lm-eval's HF model does); a longer one in consecutive
        windows of `block_size` targets from its end, each with as much context as fits.
        Windows go through the model in batches, longest first (lm-eval's Collator order).
        """
        windows = []  # (request index, input ids, target ids)
        for i, (_, context, continuation) in enumerate(requests):
            assert context and continuation, "lm-eval hands over a non-empty context and continuation"
            seq = context + continuation
            for start, end in _target_spans(len(context), len(seq), self.block_size):
                windows.append((i, seq[max(0, end - 1 - self.block_size) : end - 1], seq[start:end]))
        order = Collator(windows, sort_fn=lambda w: (-len(w[1]), tuple(w[1])))
        scored = []
        for batch in order.get_batched(n=self.batch_size):
            scored += self._score(batch)
        totals = [[0.0, True] for _ in requests]
        for (i, _, _), (logprob, greedy) in zip(windows, order.get_original(scored)):
            totals[i][0] += logprob
            totals[i][1] &= greedy
        results = [(logprob, greedy) for logprob, greedy in totals]
        for (request, _, _), result in zip(requests, results):
            if request is not None:  # None: a window of loglikelihood_rolling, cached as the whole text
                self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def _score(self, batch: list[tuple[int, list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Each window's summed target log-probability and greedy match, from one right-padded forward pass."""
        width = max(len(x) for _, x, _ in batch)
        idx = torch.tensor([x + [self.eot] * (width - len(x)) for _, x, _ in batch], dtype=torch.long,
                           device=self._device)  # (B, T)
        logits, _ = self.model(idx)  # (B, T, V)
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        out = []
        for b, (_, x, targets) in enumerate(batch):
            rows = logprobs[b, len(x) - len(targets) : len(x)]  # (n, V): the positions that predict the targets
            want = torch.tensor(targets, dtype=torch.long, device=self._device)  # (n,)
            out.append((float(rows.gather(1, want[:, None]).sum()), bool((rows.argmax(dim=-1) == want).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text after the end-of-text token, in disjoint windows of
        `block_size` tokens (lm-eval's rolling windows), every token scored exactly once."""
        results = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.block_size,
                context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            results.append(sum(logprob for logprob, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), results[-1])
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (components.generation.generate), each cut before the first of its
        `until` strings (end-of-text always among them) and at most `max_gen_toks` tokens long."""
        results = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until")
            until = handle_stop_sequences(list(until) if isinstance(until, list) else until, eos=EOT)
            max_tokens = int(gen_kwargs.get("max_gen_toks", _DEFAULT_MAX_GEN_TOKS))
            ids = (self.tok_encode(context) or [self.eot])[-self.block_size :]
            results.append(self._generate_until(ids, until, max_tokens))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), results[-1])
        return results

    def _generate_until(self, ids: list[int], until: list[str], max_tokens: int) -> str:
        idx = torch.tensor(ids, dtype=torch.long, device=self._device)[None, :]  # (1, P)
        new: list[int] = []
        while len(new) < max_tokens:
            out = generate(self.model, idx, min(_GEN_CHUNK, max_tokens - len(new)), temperature=0.0, eos_id=self.eot)
            step = out[0, idx.shape[1]:].tolist()
            new += step
            text = self.tok_decode([t for t in new if t != self.eot])
            if self.eot in step or any(stop in text for stop in until):
                break
            idx = out[:, -self.block_size :]  # (1, <=block_size): generate crops to it anyway
        text = self.tok_decode(new[: new.index(self.eot)] if self.eot in new else new)
        for stop in until:
            text = text.split(stop)[0]
        return text


def _target_spans(start: int, end: int, block_size: int) -> Iterator[tuple[int, int]]:
    """[a, b) spans covering targets start..end-1, at most block_size each, laid from the end."""
    spans = []
    while end > start:
        spans.append((max(start, end - block_size), end))
        end -= block_size
    return reversed(spans)


# ------------------------------------------------------------------ the evaluate stage's tasks


def task_metrics(model: nn.Module, tokenizer: Tokenizer, data: TokenizedData, cfg: EvaluateConfig) -> dict[str, float]:
    """Every task of `cfg.tasks` on `model` read with its own `tokenizer`, as `eval/task/<task>/<metric>`.

    The shipped task's items are built from `data`'s held-out pairs (decoded with the data's
    tokenizer), so every candidate and the champion re-evaluated beside them answer the same items.
    At most `cfg.task_limit` items per task (0: all). Held-out pairs too few for one item of the
    shipped task give only `eval/task/gptforge_which_body/items` = 0.

    Raises:
        ConfigError: a task of evaluate.tasks that lm-eval cannot load.
    """
    if not cfg.tasks:
        return {}
    results = {}
    with tempfile.TemporaryDirectory(prefix="gptforge-tasks-") as folder:
        specs = []
        for spec in cfg.tasks:
            if spec == WHICH_BODY:
                data_tokenizer = Tokenizer.from_str(storage.read_text(data.tokenizer_uri))
                try:
                    spec = write_which_body(heldout_pairs(data, data_tokenizer), folder)
                except ValueError:
                    # Too few held-out functions for one item: every model measured on this data lacks the
                    # task alike (so no task gate applies); `items` 0 says so on the run.
                    results[f"eval/task/{WHICH_BODY}/items"] = 0.0
                    continue
            specs.append(spec)
        if specs:
            results |= run_tasks(GPTForgeLM(model, tokenizer, cfg.batch_size), specs, cfg.task_limit or None)
    return results


def run_tasks(lm: GPTForgeLM, specs: list[str], limit: int | None) -> dict[str, float]:
    """lm-eval's `evaluator.evaluate` on `specs` (task names or task YAML paths) with a `TaskManager`,
    offline; its numbers as `eval/task/<task>/<metric>` (`<metric>.<filter>` for a filter other than
    lm-eval's `none`) and `eval/task/<task>/items`, the items scored.

    As `simple_evaluate` would: tasks that set no few-shot count run zero-shot, and few-shot draws
    are seeded. Unlike it, global random seeds are left alone and no environment report is taken
    (a second of subprocesses per call). Only a task given by name needs lm-eval's own index of
    tasks, which takes seconds to build.
    """
    with _offline():
        from lm_eval import evaluator
        from lm_eval.tasks import TaskManager

        logging.getLogger("lm-eval").setLevel(logging.WARNING)
        named = [s for s in specs if not s.endswith((".yaml", ".yml"))]
        manager = TaskManager(include_defaults=bool(named))
        unknown = [s for s in named if s not in manager.all_tasks]
        if unknown:
            raise ConfigError(f"evaluate.tasks: {', '.join(map(repr, unknown))} not among lm-eval's tasks "
                              f"(give a task name, {WHICH_BODY}, or the path of a task YAML)")
        try:
            loaded = manager.load(specs)
            for task in loaded["tasks"].values():
                if task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=_FEWSHOT_SEED)
            out = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=100, log_samples=False)
        except (KeyError, FileNotFoundError, ConnectionError) as why:
            raise ConfigError(f"evaluate.tasks {specs}: lm-eval could not load a task ({why})") from None
    metrics = {}
    for task, scores in out["results"].items():
        for key, value in scores.items():
            name, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in _NOT_SCORES:
                metric = name if filt in ("", "none") else f"{name}.{filt}"
                metrics[TASK_PREFIX + _safe(f"{task}/{metric}")] = float(value)
        if task in out.get("n-samples", {}):
            metrics[TASK_PREFIX + _safe(f"{task}/items")] = float(out["n-samples"][task]["effective"])
    return metrics


@contextlib.contextmanager
def _offline():
    """HF_DATASETS_OFFLINE and HF_HUB_OFFLINE set to 1 (unless set already) while the block runs."""
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    before = {n: os.environ.get(n) for n in names}
    for n in names:
        os.environ.setdefault(n, "1")
    try:
        yield
    finally:
        for n, value in before.items():
            if value is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = value


def _safe(name: str) -> str:
    """A metric name MLflow takes on every system (letters, digits, _ - . / and space)."""
    return re.sub(r"[^\w./ -]", "_", name)
