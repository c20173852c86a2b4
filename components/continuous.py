"""Iteration-level (continuous) batching: rows join and leave the running batch at every decode step.

Pure PyTorch (no Ray, no HTTP), so it is tested in one process. `ContinuousEngine` holds the
running rows of one model, each in a slot of a `SlotCache` (components/slot_cache.py);
`ContinuousBatcher` feeds it from the endpoint's queue on one thread (`serve.batching: continuous`).
The evaluate stage measures generation with the same engine (components/generation.py `generate`).

One `ContinuousEngine.step(joining)` is:
  1. rows that were cancelled (their client went away) leave and free their slots;
  2. the joining rows take the lowest free slots;
  3. one forward for every row: a decoding row feeds its last token, a joining row its prompt, or as
     much of it as the step's token budget (`max_step_tokens`, one token per decoding row counted) leaves,
     the rest at the next steps (chunked prefill). The tokens are packed into one sequence, so a join
     costs its prompt's tokens and no forward of its own, and nothing is padded;
  4. every row whose next-token logits are ready samples it, in slot order, with the same per-row code
     as the static engine (components/rows.py: sampling, healing, stop sequences, logprobs, held-back
     streaming deltas, max_tokens); greedy rows share one argmax over the batch. A request's rows start
     sampling at the same step (they draw from one seeded generator in row order, so a seeded request
     gives the same text alone or in company);
  5. rows that finished leave at once and free their slots.

Admission (`ContinuousBatcher`) is first come, first served and takes whole requests: a request joins
at the next step when its rows fit in the free slots (`serve.max_batch_size` rows in all); one that
does not fit waits, and so does everything behind it, so a large request is never starved by small ones.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from components.batching import Batcher, Work
from components.config import ServeConfig
from components.rows import Row, TokenText, _by_request, _each_live_row, _fail, _RowState, _send_prompt, sample_next
from components.slot_cache import SlotCache


@dataclass(eq=False)
class _Running:
    """A row in a slot: its state, how much of its prompt is in the cache, and its next token's logits."""

    state: _RowState
    request: list = field(default_factory=list)  # the _Running of every row of its request
    fed: int = 0  # prompt tokens in the cache
    logits: torch.Tensor | None = None  # (V,) float32 logits of its next token; None: not computed yet
    argmax: int | None = None  # of `logits`, computed for the batch at once
    prompt_logits: list = field(default_factory=list)  # (n, V) per chunk, when echo + logprobs need them
    first: bool = True  # the next token is the row's first (a healed row's is constrained)
    next_token: int | None = None  # what the next forward feeds (None while prefilling)

    def prefilling(self) -> bool:
        return self.fed < len(self.state.context)


class ContinuousEngine:
    """The running rows of one model, stepped one token at a time; rows may join before any step.

    `slots` rows at most run together, each in a slot of the cache (whose positions grow with the longest row).
    `max_step_tokens` bounds the tokens one forward computes (prompt chunks plus one per decoding row).
    `on_token(row, token)`, when set, hears every sampled token (token-level callers read them there).
    """

    def __init__(self, model, vocab: TokenText, eos_id: int, slots: int, max_step_tokens: int = 512):
        self.model, self.vocab, self.eos_id = model, vocab, eos_id
        ref = model.transformer.wpe.weight  # never quantized: its dtype is the activations' dtype
        self.device = ref.device
        self.cache = SlotCache(model.config, slots, ref.device, ref.dtype)
        if ref.device.type == "cpu" and ref.dtype == torch.float32:
            _lay_out_linears_for_few_rows(model)
        self.slots: list[_Running | None] = [None] * slots
        self.max_step_tokens = max_step_tokens
        self.on_token: Callable[[Row, int], None] | None = None
        self._joined: list[_Running] = []  # rows still prefilling, in the order they joined

    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    def free_slots(self) -> int:
        return len(self.slots) - self.running()

    def fits(self, rows: list[Row]) -> str | None:
        """Why `rows` can never run here (prompt + max_tokens past the context), or None."""
        block = self.model.config.block_size
        for r in rows:
            if len(r.prompt_ids) + r.sampling.max_tokens > block:
                return (f"a prompt of {len(r.prompt_ids)} tokens + max_tokens {r.sampling.max_tokens} is more "
                        f"than the model's context of {block} tokens")
        return None

    @torch.no_grad()
    def step(self, joining: list[Row] = ()) -> None:
        """One iteration: cancelled rows leave, `joining` rows take slots, one forward, every ready row samples."""
        for slot, r in enumerate(self.slots):
            if r is not None and r.state.row.cancelled:
                self._leave(slot)
        if len(joining) > self.free_slots():
            raise ValueError(f"{len(joining)} rows cannot join: {self.free_slots()} of {len(self.slots)} slots are free")
        if joining:
            self._join(list(joining))
        feeds = self._feeds()
        if feeds:
            self._run_isolating(feeds)
        self._sample()
        for slot, r in enumerate(self.slots):
            if r is not None and r.state.finished:
                self._leave(slot)

    def fail_all(self, error: BaseException) -> list:
        """A step failed for no one row's reason: every running request hears it, every slot is freed.

        Returns the `fail` callbacks told."""
        states = self._states()
        for slot in range(len(self.slots)):
            if self.slots[slot] is not None:
                self._leave(slot)
        requests = _by_request(states)
        for rows in requests:
            _fail([], rows[0], error if isinstance(error, Exception) else RuntimeError(repr(error)))
        return [rows[0].fail for rows in requests]

    # ------------------------------------------------------------------ steps

    def _states(self) -> list[_RowState]:
        return [r.state for r in self.slots if r is not None]

    def _join(self, rows: list[Row]) -> None:
        """Set up the joining rows and place them in the lowest free slots, in row order."""
        states, broken = [], []
        for r in rows:
            try:
                states.append(_RowState(r, self.vocab, self.eos_id))
            except Exception as error:  # noqa: BLE001 - reported to the row's request once every row is set up
                broken.append((r, error))
        for r, error in broken:
            _fail(states, r, error)
        free = (slot for slot, r in enumerate(self.slots) if r is None)
        requests: list[list[_Running]] = []  # a request's rows share one `fail` (equal, not the same object)
        for st in states:
            if st.finished:
                continue
            same = next((rows for rows in requests if rows[0].state.row.fail == st.row.fail), None)
            if same is None:
                requests.append(same := [])
            running = _Running(st, same)
            same.append(running)
            self.slots[next(free)] = running
            self._joined.append(running)

    def _feeds(self) -> list[tuple[int, list[int]]]:
        """(slot, tokens) of the next forward: one token per decoding row, then prompt chunks in join order."""
        feeds = [(slot, [r.next_token]) for slot, r in enumerate(self.slots)
                 if r is not None and r.next_token is not None]
        left, chunks = self.max_step_tokens - len(feeds), 0
        for r in self._joined:
            if not r.prefilling() or r.state.finished:
                continue
            # the first prompt always moves on, by one token at least, however many rows decode
            n = min(len(r.state.context) - r.fed, left if chunks else max(left, 1))
            if n <= 0:
                break  # first come, first served: a later prompt does not overtake an earlier one
            feeds.append((self.slots.index(r), r.state.context[r.fed: r.fed + n]))
            left, chunks = left - n, chunks + 1
        singles = [f for f in feeds if len(f[1]) == 1]  # one-token rows first: the cache attends them as a batch
        return sorted(singles) + [f for f in feeds if len(f[1]) > 1]

    def _run_isolating(self, feeds: list[tuple[int, list[int]]]) -> None:
        """The forward; when it raises with prompts in it, the decoding rows run again without them and each
        joining request apart, and a request that still raises fails alone. (A forward of decoding rows
        only that raises is no one row's fault: it raises, and the batcher fails every request.)"""
        try:
            self._run(feeds)
            return
        except Exception:  # noqa: BLE001 - whose fault it is shows when each request runs alone
            prompts = [f for f in feeds if self.slots[f[0]].next_token is None]
            if not prompts:
                raise
        decoding = [f for f in feeds if self.slots[f[0]].next_token is not None]
        if decoding:
            self._run(decoding)
        by_request: dict[int, list] = {}
        for f in prompts:
            by_request.setdefault(id(self.slots[f[0]].request), []).append(f)
        for group in by_request.values():
            try:
                self._run(group)
            except Exception as error:  # noqa: BLE001 - this request fails by itself
                _fail(self._states(), self.slots[group[0][0]].state.row, error)

    def _run(self, feeds: list[tuple[int, list[int]]]) -> None:
        """One packed forward of `feeds`; the rows whose next token it computed keep their logits."""
        # Which packed positions need logits: a row's last token when it samples next (a decoding row,
        # a prompt's last chunk), every token of a chunk whose prompt is echoed with logprobs.
        wanted: list[int] = []  # positions in the packed sequence, ascending
        ready, ends, echoed = [], [], []  # rows that sample next, their rows in `wanted`; (row, rows of wanted)
        at = 0
        for slot, tokens in feeds:
            r, start, at = self.slots[slot], at, at + len(tokens)
            s = r.state.row.sampling
            samples_next = r.next_token is not None or r.fed + len(tokens) == len(r.state.context)
            if r.next_token is None and s.echo and s.logprobs is not None:
                echoed.append((r, len(wanted), len(wanted) + len(tokens)))
                wanted += range(start, at)
            elif samples_next:
                wanted.append(at - 1)
            if samples_next:
                ready.append(r)
                ends.append(len(wanted) - 1)
        self.cache.plan([(slot, len(tokens)) for slot, tokens in feeds])
        ids = torch.tensor([t for _, tokens in feeds for t in tokens], dtype=torch.long, device=self.device)
        every = len(wanted) == at  # (then `wanted` is 0 .. N-1)
        logits_at = None if every else torch.tensor(wanted, dtype=torch.long, device=self.device)
        logits, _ = self.model(ids[None, :], cache=self.cache, logits_at=logits_at)  # (1, len(wanted), V)
        self.cache.commit()
        for r, first, last in echoed:
            r.prompt_logits.append(logits[0, first:last].float())
        for (slot, tokens) in feeds:
            r = self.slots[slot]
            if r.next_token is None:
                r.fed += len(tokens)
        if not ready:
            return
        chosen = logits[0] if len(ends) == logits.size(1) else logits[0].index_select(  # (R, V)
            0, torch.tensor(ends, dtype=torch.long, device=self.device))
        chosen = chosen.float()
        # max(...).indices, not argmax: the same first maximum, at about two thirds of the time on a CPU
        for r, row_logits, argmax in zip(ready, chosen, chosen.max(dim=-1).indices.tolist()):
            r.logits, r.argmax = row_logits, argmax
            if r.next_token is None:  # its prompt is in: echo it
                prompt = torch.cat(r.prompt_logits) if r.prompt_logits else None
                r.prompt_logits = []
                _each_live_row([r.state], lambda b, st: _send_prompt(st, prompt, self.vocab))
                if r.state.finished:  # its echo failed: its request stops
                    self._stop_request(r)

    def _stop_request(self, r: _Running) -> None:
        for sibling in r.request:
            sibling.state.finished = True

    def _sample(self) -> None:
        ready = [r for r in self.slots if r is not None and r.logits is not None and not r.state.finished
                 and all(s.logits is not None or s.state.finished for s in r.request)]
        if not ready:
            return

        def sample(b: int, st: _RowState) -> None:
            r = ready[b]
            token = sample_next(st, r.logits, self.vocab, r.first, r.argmax)
            r.next_token, r.first, r.logits = token, False, None
            if r in self._joined:
                self._joined.remove(r)
            if self.on_token is not None:
                self.on_token(st.row, token)

        _each_live_row([r.state for r in ready], sample)  # in slot order; a row that raises fails its own request

    def _leave(self, slot: int) -> None:
        r = self.slots[slot]
        if r in self._joined:
            self._joined.remove(r)
        self.slots[slot] = None
        self.cache.free(slot)


def _lay_out_linears_for_few_rows(model: torch.nn.Module) -> None:
    """Store each float32 `nn.Linear` weight (out, in) as the transpose of a contiguous (in, out) tensor.

    The same values and shapes, another memory layout (in place: the model's other users, a tied
    embedding included, see the same weights). A decoding step multiplies a few rows by each weight,
    and on a CPU `x @ W` over a contiguous (in, out) W ran 1.2-1.7x as fast as nn.Linear's usual
    `x @ W.T` over (out, in), at 1 to 40 rows (benchmarks/RESULTS.md). Saving is unaffected (save_model
    writes contiguous copies). Quantized weights (tensor subclasses) are left as they are."""
    for module in model.modules():
        w = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and type(w) is torch.nn.Parameter and w.dtype == torch.float32
                and w.dim() == 2 and w.stride() != (1, w.size(0))):
            w.data = w.data.t().contiguous().t()


class ContinuousBatcher(Batcher):
    """The endpoint's queue (backpressure included) feeding a `ContinuousEngine` on one background thread.

    `engine_for(model)` builds the engine of a model (Work.model); the running rows all belong to one
    model, and a request for another (a registry swap) waits until they have finished.
    """

    def __init__(self, engine_for: Callable[[object], ContinuousEngine], cfg: ServeConfig):
        self._engine_for = engine_for
        self.max_step_tokens = cfg.max_step_tokens
        self.engine: ContinuousEngine | None = None
        self._engine_model: object = None
        super().__init__(run=lambda model, works: None, cfg=cfg, fits=lambda model, rows: True)

    def running_rows(self) -> int:
        engine = self.engine
        return 0 if engine is None else engine.running()

    def _admit(self) -> list[Work] | None:
        """The works that join at the next step (waiting while there is nothing to do); None once stopped.

        No waiting for company: a join costs its prompt's tokens in the step's one forward, not a forward
        of its own, so a request joins at the very next step."""
        with self._cond:
            while not self._queue and not self.running_rows() and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            running = self.running_rows()
            # The running rows' model, or (idle) the next request's: one model runs at a time.
            model = self._engine_model if running else (self._queue[0].model if self._queue else None)
            joined, rows = [], running
            while self._queue and self._queue[0].model is model:
                work = self._queue[0]
                if (running or joined) and rows + len(work.rows) > self.max_batch_rows:
                    break  # first come, first served: nothing overtakes the head of the queue
                self._queue.popleft()
                self._queued_rows -= len(work.rows)
                work.started_at = time.monotonic()
                joined.append(work)
                rows += len(work.rows)
            return joined

    def _loop(self) -> None:
        while True:
            joined = self._admit()
            if joined is None:
                return
            try:
                if joined and joined[0].model is not self._engine_model:  # only when idle (see _admit)
                    self.engine, self._engine_model = self._engine_for(joined[0].model), joined[0].model
                    self.engine.max_step_tokens = self.max_step_tokens
                rows = []
                for work in joined:
                    why = self.engine.fits(work.rows)
                    if why is None:
                        rows += work.rows
                    else:
                        _tell(work, ValueError(why))
                expected = self.engine.running() + len(rows)
                self.engine.step(rows)
                # Each row that finished told its listener; give their threads the interpreter now (one
                # turn each), between steps, so that what they do with the answer (send the next request,
                # stream the last delta) happens before the next step is planned and not during its
                # forward. Measured on the uniform load: ~1 more running row a step, and shorter steps.
                for _ in range(expected - self.engine.running()):
                    time.sleep(0)
            except BaseException as error:  # noqa: BLE001 - a failed step fails its requests, not the loop
                logging.getLogger(__name__).exception("a continuous batching step failed")
                told = self.engine.fail_all(error) if self.engine is not None else []
                for work in joined:
                    if work.fail not in told:
                        _tell(work, error)


def _tell(work: Work, error: BaseException) -> None:
    try:
        work.fail(error)
    except Exception:  # noqa: BLE001 - one request's listener must not stop the loop
        logging.getLogger(__name__).exception("could not report a failed step")
