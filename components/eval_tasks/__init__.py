"""The lm-eval task shipped with gptforge: "which body belongs to this function".

Each item is a held-out documented function: the context is its signature and docstring,
the choices are its true body and the bodies of `WHICH_BODY_CHOICES - 1` other held-out
functions (chance = 1 / WHICH_BODY_CHOICES = 25%); lm-eval scores every choice by its
log-likelihood after the context and reports `acc` and `acc_norm` (per character of the body).

The items come only from the held-out side: the (prompt, completion) pairs that the data stage
wrote to `sft_heldout.parquet`, decoded as `components.bpb.heldout_pairs` does (a body longer
than the row the data stage stored is cut there). No training pair is ever an item or a choice.
Distractors are drawn, where enough exist, from bodies with the same first-line indentation as
the true body, so a method's body is not told from a function's by its indentation alone.

The data file is written to a local folder with a copy of `gptforge_which_body.yaml` that points
at it (`dataset_path: json`, `dataset_kwargs.data_files`), so the task runs offline.

Scale: for GPT-2 124M, lm-eval's HellaSwag acc_norm is about 31% (chance 25%); a model trained
for minutes on a laptop is expected near chance on HellaSwag, which is why the task is built from
the project's own corpus.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import yaml

WHICH_BODY = "gptforge_which_body"  # the task's name in evaluate.tasks and in the metric keys
WHICH_BODY_CHOICES = 4
WHICH_BODY_DATA = "which_body.jsonl"
_TEMPLATE = Path(__file__).with_name(f"{WHICH_BODY}.yaml")


def task_spec_problem(spec: str) -> str | None:
    """What is wrong with one entry of `evaluate.tasks` (a task name, or the path of a task YAML), or None."""
    if not spec.strip():
        return f"must not be empty, got {spec!r}"
    if spec.endswith((".yaml", ".yml")) and not Path(spec).is_file():
        return f"{spec!r}: no such task file (give an lm-eval task name, {WHICH_BODY}, or a task YAML's path)"
    return None


def which_body_items(pairs: list[tuple[str, str]], n_choices: int = WHICH_BODY_CHOICES) -> list[dict]:
    """Multiple-choice items from (signature+docstring, body) pairs, in a fixed hash order.

    Every item is {"context", "choices", "label", "doc_id"}: `choices[label]` is the pair's own body,
    the others are `n_choices - 1` distinct other bodies, drawn with a seed taken from the pair's
    text, so the same pairs always give the same items. A pair whose body is shared with another
    pair (`pass`, `raise NotImplementedError`), or whose signature and docstring are (the same method
    in two classes), is left out: it would have two right answers.

    Raises:
        ValueError: fewer than `n_choices` distinct bodies to build items from, or no item at all.
    """
    counts: dict[str, int] = {}
    for context, body in set(pairs):
        counts[context] = counts.get(context, 0) + 1
        counts[body] = counts.get(body, 0) + 1
    unique = sorted({p for p in pairs if counts[p[0]] == counts[p[1]] == 1}, key=lambda p: _digest(*p))
    bodies = sorted({body for _, body in pairs})
    if len(bodies) < n_choices:
        raise ValueError(f"{WHICH_BODY}: {len(bodies)} distinct held-out function bodies, {n_choices} are needed "
                         f"for one item (more held-out pairs: finetune.max_pairs or finetune.heldout_fraction)")
    by_indent: dict[str, list[str]] = {}
    for body in bodies:
        by_indent.setdefault(_indent(body), []).append(body)
    items = []
    for context, body in unique:
        rng = random.Random(_digest(context, body))
        same = [b for b in by_indent[_indent(body)] if b != body]
        pool = same if len(same) >= n_choices - 1 else [b for b in bodies if b != body]
        wrong = rng.sample(pool, n_choices - 1)
        label = rng.randrange(n_choices)
        items.append({"context": context, "choices": wrong[:label] + [body] + wrong[label:], "label": label,
                      "doc_id": _digest(context, body)[:16]})
    if not items:
        raise ValueError(f"{WHICH_BODY}: no held-out pair has a body and a docstring of its own")
    return items


def write_which_body(pairs: list[tuple[str, str]], folder: str | Path) -> str:
    """Write the items (`which_body.jsonl`) and the task's YAML pointing at them into `folder`.

    Returns:
        the path of the YAML, which `lm_eval` takes as a task (`--tasks PATH`, `TaskManager.load`).
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / WHICH_BODY_DATA
    data.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in which_body_items(pairs)),
                    encoding="utf-8")
    config = yaml.safe_load(_TEMPLATE.read_text(encoding="utf-8"))
    # the datasets cache beside the data: nothing is written to (or read from) the user's HF cache
    config["dataset_kwargs"] = {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf_cache")}
    out = folder / f"{WHICH_BODY}.yaml"
    out.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return str(out)


def _indent(body: str) -> str:
    first = next((line for line in body.split("\n") if line.strip()), "")
    return first[: len(first) - len(first.lstrip())]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()
