"""Iteration-level (continuous) batching: rows join and leave the running batch at every decode step.

Pure PyTorch (no Ray, no HTTP), so it is tested in one process. `ContinuousEngine` holds the
running rows of one model, each in a slot of a `SlotCache` (components/slot_cache.py);
`ContinuousBatcher` feeds it from the endpoint's queue on one thread (`serve.batching: continuous`).

One `ContinuousEngine.step(joining)` is:
  1. rows that were cancelled (their client went away) leave and free their slots;
  2. prefill step: the joining rows take the lowest free slots and their prompts run as one forward
     of their own (right-padded, each from position 0), before and apart from the decode step, so a
     join never touches the running rows' caches and a long prompt costs one forward, not one per token;
  3. every row samples its next token (the joiners their first, from their prefill), in slot order,
     with the same per-row code as the static engine (components/rows.py: sampling, healing, stop
     sequences, logprobs, held-back streaming deltas, max_tokens);
  4. rows that finished leave at once and free their slots;
  5. decode step: one forward of one token for every row still running.

Admission (`ContinuousBatcher`) is first come, first served and takes whole requests (a request's rows
share one seeded generator, drawn in row order; joining together keeps that order, so a seeded request
gives the same text alone or in company): a request joins when its rows fit in the free slots
(`serve.max_batch_size` rows in all) and the step's tokens (its prompts' plus one per running row) stay
within `serve.max_step_tokens`. While rows run, queued requests gather for up to
`serve.batch_wait_timeout_s` (or until they would fill every free slot) and then join together: each
join costs a prefill forward of its own, and on a small model that costs as much as a decode step,
so joining one request per step would halve the decode rate. The head of the queue always joins an idle
engine; a request that does not fit waits, and so does everything behind it, so a long prompt is never
starved by short ones.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from components.batching import Batcher, Work
from components.config import ServeConfig
from components.rows import Row, TokenText, _by_request, _each_live_row, _fail, _RowState, _send_prompt, sample_next
from components.slot_cache import SlotCache


@dataclass
class _Running:
    """A row in a slot: its state, and the (V,) float32 logits of its next token (None: none yet)."""

    state: _RowState
    logits: torch.Tensor | None = None
    first: bool = True  # the next token is the row's first (a healed row's is constrained)
    next_token: int = 0  # what the decode step feeds


class ContinuousEngine:
    """The running rows of one model, stepped one token at a time; rows may join before any step.

    `slots` rows at most run together; the cache is preallocated for them at the model's context.
    """

    def __init__(self, model, vocab: TokenText, eos_id: int, slots: int):
        self.model, self.vocab, self.eos_id = model, vocab, eos_id
        ref = model.transformer.wpe.weight  # never quantized: its dtype is the activations' dtype
        self.device = ref.device
        self.cache = SlotCache(model.config, slots, ref.device, ref.dtype)
        self.slots: list[_Running | None] = [None] * slots

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
        """One iteration: cancelled rows leave, `joining` rows prefill, every row samples, the rest decode."""
        for slot, r in enumerate(self.slots):
            if r is not None and r.state.row.cancelled:
                self._leave(slot)
        if len(joining) > self.free_slots():
            raise ValueError(f"{len(joining)} rows cannot join: {self.free_slots()} of {len(self.slots)} slots are free")
        if joining:
            self._join(list(joining))
        states = [r.state for r in self.slots if r is not None]
        by_state = {id(r.state): r for r in self.slots if r is not None}

        def sample(b: int, st: _RowState) -> None:
            r = by_state[id(st)]
            r.next_token = sample_next(st, r.logits, self.vocab, r.first)
            r.first = False

        _each_live_row(states, sample)  # in slot order; a row that raises fails its own request only
        for slot, r in enumerate(self.slots):
            if r is not None and r.state.finished:
                self._leave(slot)
        self._decode()

    def fail_all(self, error: BaseException) -> list:
        """A step failed for no one row's reason: every running request hears it, every slot is freed.

        Returns the `fail` callbacks told."""
        states = [r.state for r in self.slots if r is not None]
        for slot in range(len(self.slots)):
            if self.slots[slot] is not None:
                self._leave(slot)
        requests = _by_request(states)
        for rows in requests:
            _fail([], rows[0], error if isinstance(error, Exception) else RuntimeError(repr(error)))
        return [rows[0].fail for rows in requests]

    # ------------------------------------------------------------------ steps

    def _join(self, rows: list[Row]) -> None:
        """Set up, place and prefill the joining rows; a prefill that raises is run again request by request."""
        states, broken = [], []
        for r in rows:
            try:
                states.append(_RowState(r, self.vocab, self.eos_id))
            except Exception as error:  # noqa: BLE001 - reported to the row's request once every row is set up
                broken.append((r, error))
        for r, error in broken:
            _fail(states, r, error)
        states = [st for st in states if not st.finished]
        free = [slot for slot, r in enumerate(self.slots) if r is None]
        placed = list(zip(free, states))  # the lowest free slots, in row order
        try:
            self._prefill(placed)
        except Exception as error:  # noqa: BLE001 - whose fault it is shows when each request runs alone
            requests = _by_request(states)
            if len(requests) < 2:
                _fail(states, states[0].row, error)
                return
            for alone in requests:  # nothing has been sent yet: each request prefills on its own
                mine = [(slot, st) for slot, st in placed if any(st.row is r for r in alone)]
                try:
                    self._prefill(mine)
                except Exception as error:  # noqa: BLE001 - this request fails by itself
                    _fail([st for _, st in mine], alone[0], error)

    def _prefill(self, placed: list[tuple[int, _RowState]]) -> None:
        if not placed:
            return
        lengths = [len(st.context) for _, st in placed]
        idx = torch.full((len(placed), max(lengths)), self.eos_id, dtype=torch.long)  # (B, T), right-padded
        for b, (_, st) in enumerate(placed):
            idx[b, : lengths[b]] = torch.tensor(st.context, dtype=torch.long)
        self.cache.prefill([slot for slot, _ in placed], lengths)
        logits, _ = self.model(idx.to(self.device), cache=self.cache)  # (B, T, V)
        states = [st for _, st in placed]
        for b, (slot, st) in enumerate(placed):
            self.slots[slot] = _Running(st, logits[b, lengths[b] - 1].float())
        _each_live_row(states, lambda b, st: _send_prompt(st, logits[b, : lengths[b]], self.vocab))

    def _decode(self) -> None:
        live = [slot for slot, r in enumerate(self.slots) if r is not None]
        if not live:
            return
        upto = live[-1] + 1
        ids = torch.full((upto, 1), self.eos_id, dtype=torch.long)  # (B, 1): free slots feed a dummy token
        mask = torch.zeros(upto, dtype=torch.bool)
        for slot in live:
            ids[slot, 0], mask[slot] = self.slots[slot].next_token, True
        self.cache.decode(upto, mask)
        logits, _ = self.model(ids.to(self.device), cache=self.cache)  # (B, 1, V)
        logits = logits[:, -1, :].float()  # (B, V)
        for slot in live:
            self.slots[slot].logits = logits[slot]

    def _leave(self, slot: int) -> None:
        self.slots[slot] = None
        self.cache.free(slot)


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
        """The works that join at the next step (waiting while there is nothing to do); None once stopped."""
        with self._cond:
            while not self._queue and not self.running_rows() and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            running = self.running_rows()
            # The running rows' model, or (idle) the next request's: one model runs at a time.
            model = self._engine_model if running else (self._queue[0].model if self._queue else None)
            joined, rows, tokens = [], running, running
            if running and self._queue and self._queued_rows < self.max_batch_rows - running and (
                    time.monotonic() < self._queue[0].queued_at + self.wait_s):
                return joined  # let joiners gather for a while: one prefill forward for several costs less
            while self._queue and self._queue[0].model is model:
                work = self._queue[0]
                prompt_tokens = sum(len(r.prompt_ids) for r in work.rows)
                if (running or joined) and (rows + len(work.rows) > self.max_batch_rows
                                            or tokens + prompt_tokens > self.max_step_tokens):
                    break  # first come, first served: nothing overtakes the head of the queue
                self._queue.popleft()
                self._queued_rows -= len(work.rows)
                work.started_at = time.monotonic()
                joined.append(work)
                rows, tokens = rows + len(work.rows), tokens + prompt_tokens
            return joined

    def _loop(self) -> None:
        while True:
            joined = self._admit()
            if joined is None:
                return
            try:
                if joined and joined[0].model is not self._engine_model:  # only when idle (see _admit)
                    self.engine, self._engine_model = self._engine_for(joined[0].model), joined[0].model
                rows = []
                for work in joined:
                    why = self.engine.fits(work.rows)
                    if why is None:
                        rows += work.rows
                    else:
                        _tell(work, ValueError(why))
                self.engine.step(rows)
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
