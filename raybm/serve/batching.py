"""Texts of concurrent requests sharing model calls, without waiting when nothing else is
waiting (a replica's dynamic batching).

Ray Serve's ``@serve.batch`` waits up to its timeout for a batch to fill even when the
model is idle and no other request is on its way: at one request at a time that wait is
added to every answer. Here a text that finds the model idle is run at once, and texts
that arrive while the model is busy wait for it and then share its next call (up to
``max_batch_size``): batches are as large as the load makes them, and no larger.

A text alone (the model idle, nothing else waiting) whose kind of call has lately been
quick runs on the event loop itself: handing it to the model's thread and the answer back
wakes two sleeping threads, 1.3 ms of a request at one at a time on 2 CPUs (BENCHMARKS.md).
Anything that arrives meanwhile waits in the socket until the call ends, as it would have
waited for the model anyway."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Batcher:
    """``await batcher(text)`` -> ``run``'s answer for that text, where ``run(texts)`` (a
    blocking function, run in a thread so the event loop keeps reading requests) answers a
    list of texts with one item per text. One model call at a time, always on the same
    thread of the batcher's own (a model call hopping between the threads of asyncio's
    shared pool took 1-3 ms longer on a CPU, measured in BENCHMARKS.md). ``wait_s``: when the
    model was idle, how long to let more texts gather before the first call (0: none).
    ``inline_under_s``: a text alone runs on the event loop when the last one-text call took
    less than this (0: never; the loop then stays free for other requests during every call)."""

    def __init__(
        self,
        run: Callable[[list[str]], list[Any]],
        max_batch_size: int,
        wait_s: float = 0.0,
        inline_under_s: float = 0.0,
    ) -> None:
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.inline_under_s = inline_under_s
        self.lone_call_s: float | None = None  # how long the last one-text call took (None: none yet)
        self.waiting: deque[tuple[str, asyncio.Future]] = deque()
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raybm-model")
        self.busy = False
        self.calls = 0  # model calls made, and texts they answered (for tests and benchmarks)
        self.texts = 0
        self.inline_calls = 0
        self.answered_at: float | None = None  # time.monotonic() of the last call that answered a text

    def answered_within(self, seconds: float) -> bool:
        """Whether a model call answered at least one text (not an exception in its place)
        in the last ``seconds``."""
        return self.answered_at is not None and time.monotonic() - self.answered_at < seconds

    async def __call__(self, text: str) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((text, future))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            if self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            while self.waiting:
                batch: list = []
                while self.waiting and len(batch) < self.max_batch_size:
                    text, future = self.waiting.popleft()
                    if not future.done():  # a request cancelled meanwhile (timeout, client gone) is dropped
                        batch.append((text, future))
                if batch:
                    alone = len(batch) == 1 and not self.waiting
                    quick = self.lone_call_s is not None and self.lone_call_s < self.inline_under_s
                    await self._call([text for text, _ in batch], [future for _, future in batch], alone and quick)
        finally:
            self.busy = False

    async def _call(self, texts: list[str], futures: list[asyncio.Future], inline: bool) -> None:
        started = time.perf_counter()
        try:
            if inline:
                self.inline_calls += 1
                answers = self.run(texts)
            else:
                answers = await asyncio.get_running_loop().run_in_executor(self.thread, self.run, texts)
            if len(answers) != len(texts):
                raise RuntimeError(f"the model answered {len(answers)} rows for {len(texts)} texts")
            if not all(isinstance(a, Exception) for a in answers):
                self.answered_at = time.monotonic()
        except Exception as e:  # noqa: BLE001 - every waiting request gets the failure, the replica goes on
            answers = [e] * len(texts)
        if len(texts) == 1:
            self.lone_call_s = time.perf_counter() - started
        self.calls += 1
        self.texts += len(texts)
        for future, answer in zip(futures, answers):
            if not future.done():
                future.set_result(answer)
