"""A scheduler's decode round: sample each active job's next token, hand the tokens out, then
run the model for the whole batch (the fused K-token loop, or one decode step); see
gru_serve.engine.scheduler for the whole."""

from __future__ import annotations

import time

import numpy as np

from gru_serve.engine.batch import Batch
from gru_serve.engine.work import Job
from gru_serve.outputs import Tokens
from gru_serve.sampling import sample, uniforms
from gru_serve.scoring import token_logprobs


class DecodeRounds:
    """The Scheduler's rounds (a mixin: they read and update its batch, jobs and counters)."""

    def _members(self, jobs: list[Job]) -> Batch:
        """The batch arrays for `jobs`: reused while the members stay, else rebuilt with the
        rows of staying jobs taken from the old arrays and the newcomers' from the jobs."""
        old = self._batch
        if old is not None and old.jobs == jobs:
            return old
        if old is not None and old.fused is not None:
            return self._members_on_device(old, jobs)
        if old is None:
            state = np.stack([j.state for j in jobs])
            logits = np.stack([j.logits for j in jobs])
        else:
            rows = {id(j): i for i, j in enumerate(old.jobs)}
            old_state = old.state()
            state = np.stack([old_state[rows[id(j)]] if id(j) in rows else j.state for j in jobs])
            logits = np.stack([old.logits[rows[id(j)]] if id(j) in rows else j.logits for j in jobs])
        self._batch = Batch(list(jobs), state, logits)
        return self._batch

    def _members_on_device(self, old: Batch, jobs: list[Job]) -> Batch:
        """The batch for `jobs` from one whose state is on the device: the staying rows' state,
        next tokens and logits stay there; the newcomers' come from their jobs."""
        assert old.fused is not None and old.next_tokens is not None
        rows = {id(j): i for i, j in enumerate(old.jobs)}
        new = [r for r, j in enumerate(jobs) if id(j) not in rows]
        origin = np.array([rows.get(id(j), -1) for j in jobs], np.int64)
        order, extra = origin.copy(), np.arange(len(old.jobs), len(old.jobs) + len(new))
        order[new] = extra
        shape = (0, *self.runtime.state_shape)
        new_rows = np.stack([jobs[r].state for r in new]) if new else np.zeros(shape, np.float32)
        batch = Batch(list(jobs), None, None)
        batch.fused = old.fused.with_members(order, new_rows, batch.columns)
        batch.device_logits, batch.origin = old.device_logits, origin
        tokens = np.zeros(len(jobs), np.int64)
        kept = origin >= 0
        tokens[kept] = old.next_tokens[origin[kept]]
        if new:
            # Sampling is per row (counter-based uniforms): the newcomers alone draw what they
            # would draw in the whole batch.
            logits = np.stack([jobs[r].logits for r in new])
            u = uniforms(batch.seeds[new], batch.positions()[new])
            tokens[new] = (
                sample(logits, u=u, **{name: col[new] for name, col in batch.columns.items()})
                if batch.any_sampled
                else logits.argmax(axis=1)
            )
        batch.next_tokens = tokens
        self._batch = batch
        return batch

    def _round(self) -> None:
        jobs = self._active
        n = len(jobs)
        self.last_batch_size = n
        self.peak_batch_size = max(self.peak_batch_size, n)
        batch = self._members(jobs)
        positions = batch.positions()
        if batch.next_tokens is not None:  # drawn on the device by the last fused round
            tokens = batch.next_tokens
        elif batch.any_sampled:
            tokens = sample(batch.logits, u=uniforms(batch.seeds, positions), **batch.columns)
        else:
            tokens = batch.logits.argmax(axis=1)
        lp_rows = batch.logprobs
        first_lp = token_logprobs(batch.logits_rows(lp_rows), tokens[lp_rows]) if lp_rows else ()
        lps = dict(zip(batch.logprobs, first_lp, strict=True))
        now = time.perf_counter()
        lookup = self._lookup
        left = np.empty(n, np.int64)  # tokens each job may still take in this round
        firsts: list[Tokens] = []
        fresh: list[bool] = []
        for i, job in enumerate(jobs):
            tid = int(tokens[i])
            text = lookup[tid] if lookup is not None else job.stream.push((tid,))[0]
            fresh.append(job.first_token_at is None)
            if job.first_token_at is None:
                job.first_token_at = now
            job.generated += 1
            stops = job.stops
            if stops is not None and (hit := stops.feed((text,))) is not None:
                job.stop_hit = hit.stop
                left[i] = 0
            else:
                left[i] = rest = job.max_new_tokens - job.generated
                if not rest and lookup is None:
                    text += job.stream.flush()  # its last token: the text held back goes too
            lp = lps.get(i)
            firsts.append(Tokens([tid], [text], job.generated - 1, None if lp is None else [float(lp)]))
        self.tokens += n
        k = self._fused_steps(n, int(left.max()), self._read_s)
        # A newcomer's first token goes out now, before the model runs; in a fused round the
        # others' goes out with the tokens the loop makes (one message instead of two).
        for i, job in enumerate(jobs):
            if k == 1 or fresh[i]:
                job.emit(firsts[i])
        if self.flush is not None:
            self.flush()  # before the model runs, as the comment above says
        try:
            if k > 1:
                held = [None if fresh[i] else firsts[i] for i in range(n)]
                self._fused_round(batch, tokens, positions, left, k, held)
            else:
                self._step_round(batch, tokens)
        except Exception as e:
            self._fail(jobs, e)
            self._active = []
            self._batch = None
            return
        self.rounds += 1

    def _fused_steps(self, n: int, most_left: int, spent_s: float = 0.0) -> int:
        """Steps for this round: 1 (a decode step) or K for the fused loop, K - 1 being the
        tokens the longest-running job still takes, within fused_tokens and the time budget
        less `spent_s` (the prompts and model runs read before it: the streams wait for both)."""
        if self.fused_tokens <= 1 or most_left < 1 or not self.runtime.has_fused:
            return 1
        # Measured on this batch size's rounds, else the runtime's measure at load (its device).
        cost = self._step_cost.get(n) or self.runtime.fused_step_cost(n)
        budget = max(2, int((self.round_budget_s - spent_s) / cost))
        return min(self.fused_tokens, most_left + 1, budget)

    def _step_round(self, batch: Batch, tokens: np.ndarray) -> None:
        """Feed this round's tokens in one batched decode step. IOBinding pays off over many
        steps of one batch: with the fused path on, a step round is a batch's last, so it runs
        plainly."""
        if self.io_binding and (self.fused_tokens <= 1 or not self.runtime.has_fused):
            if batch.decoder is None:
                batch.decoder = self.runtime.decoder(batch.state())
                self.decoders += 1
                batch.decoder_current = True
            elif not batch.decoder_current:
                batch.decoder.load(batch.state())
                batch.decoder_current = True
            batch.logits = batch.decoder.step(tokens).copy()
            batch.host_state = batch.decoder.state() if self.runtime.device == "cpu" else None
        else:
            logits, batch.host_state = self.runtime.step(tokens[:, None].astype(np.int64), batch.state())
            batch.logits = logits[:, 0]
        batch.fused, batch.next_tokens, batch.device_logits = None, None, None
        still = []
        for i, job in enumerate(batch.jobs):
            if job.stop_hit or job.generated >= job.max_new_tokens:
                job.logits, job.state = batch.logits[i].copy(), batch.state()[i].copy()
                self._finish(job, "stop" if job.stop_hit else "length")
            elif not job.cancelled:
                still.append(job)
        self._active = still

    def _fused_round(
        self,
        batch: Batch,
        tokens: np.ndarray,
        positions: np.ndarray,
        left: np.ndarray,
        k: int,
        held: list[Tokens | None],
    ) -> None:
        """Feed this round's tokens, then generate up to k - 1 more per job in one run; `held`
        are first tokens not handed out yet."""
        n = len(batch.jobs)
        u = (
            uniforms(
                np.repeat(batch.seeds, k), (positions[:, None] + np.arange(1, k + 1, dtype=np.uint64)).ravel()
            )
            if batch.any_sampled
            else np.zeros(n * k)
        ).reshape(n, k)
        t0 = time.perf_counter()
        if batch.fused is None:
            batch.fused = self.runtime.fused_batch(batch.state(), batch.columns)
        fused = batch.fused
        sampled = fused.run(tokens, u)
        self.fused_rounds += 1
        lookup = self._lookup
        lp_rows = set(batch.logprobs)
        chunks, ends, finished = [], [], []
        for i, job in enumerate(batch.jobs):
            take = int(min(left[i], k - 1))  # tokens from the loop: sampled[0 .. take - 1]
            ids = sampled[:take, i].tolist()
            texts = [lookup[t] for t in ids] if lookup is not None else job.stream.push(ids)
            end = take  # the job's last fed token is step index `end`
            stops = job.stops
            if stops is not None and take and (hit := stops.feed(texts)) is not None:
                job.stop_hit = hit.stop
                end = hit.index + 1
                del ids[end:], texts[end:]
            elif take and lookup is None and job.generated + take >= job.max_new_tokens:
                texts[-1] += job.stream.flush()  # its last token: the text held back goes too
            chunks.append((ids, texts))
            ends.append(end)
            if job.stop_hit or job.generated + end >= job.max_new_tokens:
                finished.append(i)
        # Only these rows come back from the device: the logprob rows' logits, and the logits
        # and state of the rows that finish (one fetch each).
        lp_pairs = [(j, i) for i in sorted(lp_rows) for j in range(ends[i])]
        lp_logits = fused.rows_logits(lp_pairs) if lp_pairs else None
        lp_at = {pair: r for r, pair in enumerate(lp_pairs)}
        done_pairs = [(ends[i], i) for i in finished]
        done_logits = fused.rows_logits(done_pairs) if done_pairs else None
        done_states = fused.rows_states(done_pairs) if done_pairs else None
        done_at = {i: r for r, i in enumerate(finished)}
        still = []
        for i, job in enumerate(batch.jobs):
            (ids, texts), end = chunks[i], ends[i]
            lps = None
            if i in lp_rows:
                rows = lp_logits[[lp_at[(j, i)] for j in range(end)]] if end else np.zeros((0, 1), np.float32)
                lps = token_logprobs(rows, sampled[:end, i]).tolist()
            chunk = Tokens(ids, texts, job.generated, lps)
            job.generated += end
            first = held[i]
            if first is not None:
                first.extend(chunk)
                chunk = first
            if chunk.ids:
                job.emit(chunk)
            self.tokens += end
            self.fused_tokens_generated += end
            if i in done_at:
                job.logits, job.state = done_logits[done_at[i]].copy(), done_states[done_at[i]].copy()
                self._finish(job, "stop" if job.stop_hit else "length")
            elif not job.cancelled:
                still.append(job)
        batch.logits, batch.host_state = None, None
        batch.next_tokens = sampled[k - 1]
        batch.device_logits, batch.origin = (fused, k - 1), np.arange(n)
        batch.decoder_current = False
        self._active = still
        cost = (time.perf_counter() - t0) / k  # the run and handing out its tokens, per step
        self._step_cost[n] = 0.8 * self._step_cost.get(n, cost) + 0.2 * cost
