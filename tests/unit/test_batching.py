"""A replica's batcher (raybm.serve.batching): no wait when the model is idle, the texts that
arrive while it is busy share its next call, and every request gets its own answer."""

import asyncio
import threading
import time

import pytest

from raybm.serve.batching import Batcher


class Model:
    """Answers each text with its upper-case form; holds each call until ``release`` is set
    once ``hold`` is, and notes each call's texts."""

    def __init__(self, hold: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.started, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, texts: list[str]) -> list[str]:
        self.calls.append(list(texts))
        self.started.set()
        assert self.release.wait(10)
        return [t.upper() for t in texts]


async def _busy_then(batcher: Batcher, model: Model, later: list[str]) -> tuple[str, list[str]]:
    first = asyncio.ensure_future(batcher("a"))
    await asyncio.to_thread(model.started.wait, 10)  # the model is busy with "a" alone
    rest = [asyncio.ensure_future(batcher(t)) for t in later]
    await asyncio.sleep(0.05)
    model.release.set()
    return await first, list(await asyncio.gather(*rest))


def test_a_text_that_finds_the_model_idle_runs_alone_at_once_and_those_arriving_meanwhile_share_the_next_call():
    model = Model(hold=True)
    batcher = Batcher(model, max_batch_size=32)
    first, rest = asyncio.run(_busy_then(batcher, model, ["b", "c", "d", "e", "f"]))
    assert first == "A" and rest == ["B", "C", "D", "E", "F"]
    assert model.calls == [["a"], ["b", "c", "d", "e", "f"]]
    assert (batcher.calls, batcher.texts, batcher.busy) == (2, 6, False)


def test_batches_never_exceed_max_batch_size():
    model = Model(hold=True)
    batcher = Batcher(model, max_batch_size=4)
    _, rest = asyncio.run(_busy_then(batcher, model, [str(i) for i in range(10)]))
    assert rest == [str(i) for i in range(10)]
    assert [len(c) for c in model.calls] == [1, 4, 4, 2]


def test_a_cancelled_request_is_not_run_and_the_others_are_answered():
    async def scenario(batcher, model):
        first = asyncio.ensure_future(batcher("a"))
        await asyncio.to_thread(model.started.wait, 10)
        gone, kept = asyncio.ensure_future(batcher("gone")), asyncio.ensure_future(batcher("kept"))
        await asyncio.sleep(0.01)
        gone.cancel()
        model.release.set()
        return await first, await kept

    model = Model(hold=True)
    assert asyncio.run(scenario(Batcher(model, 8), model)) == ("A", "KEPT")
    assert model.calls == [["a"], ["kept"]]


@pytest.mark.parametrize(
    "run, message",
    [(lambda texts: 1 / 0, "division by zero"), (lambda texts: texts[:-1], "answered 1 rows for 2 texts")],
)
def test_a_failed_call_answers_each_of_its_requests_with_the_error_and_the_batcher_goes_on(run, message):
    async def scenario():
        batcher = Batcher(run, 8, wait_s=0.02)  # the two texts gather into one call
        answers = await asyncio.gather(batcher("x"), batcher("y"))
        batcher.run = lambda texts: [t * 2 for t in texts]
        return answers, await batcher("z")

    answers, after = asyncio.run(scenario())
    assert all(isinstance(a, Exception) and message in str(a) for a in answers)
    assert after == "zz"


class Where:
    """Answers each text with its upper-case form after ``delay`` seconds, noting for each
    call whether it ran on the event loop's thread or another."""

    def __init__(self) -> None:
        self.delay, self.loop_thread, self.where = 0.0, None, []

    def __call__(self, texts: list[str]) -> list[str]:
        self.where.append("loop" if threading.get_ident() == self.loop_thread else "thread")
        time.sleep(self.delay)
        return [t.upper() for t in texts]


def test_a_text_alone_runs_on_the_event_loop_while_one_text_calls_are_quick_and_on_the_model_thread_otherwise():
    async def scenario(model: Where, batcher: Batcher) -> list[str]:
        model.loop_thread = threading.get_ident()
        answers = [await batcher("a"), await batcher("b")]  # the first call is timed on the thread
        model.delay = 0.08  # slower than inline_under_s: the call after it goes back to the thread
        answers += [await batcher("c"), await batcher("d")]
        model.delay = 0.0
        return answers + [await batcher("e"), await batcher("f")]

    model = Where()
    batcher = Batcher(model, 8, inline_under_s=0.05)
    assert asyncio.run(scenario(model, batcher)) == ["A", "B", "C", "D", "E", "F"]
    assert model.where == ["thread", "loop", "loop", "thread", "thread", "loop"]
    assert (batcher.calls, batcher.inline_calls) == (6, 3)

    never = Where()  # inline_under_s=0 (the default): always on the model's thread
    asyncio.run(scenario(never, Batcher(never, 8)))
    assert never.where == ["thread"] * 6


def test_texts_with_others_waiting_run_on_the_model_thread_even_when_calls_are_quick():
    async def scenario(model: Where, batcher: Batcher) -> list[str]:
        model.loop_thread = threading.get_ident()
        await batcher("warm")  # one quick call timed on the thread
        return list(await asyncio.gather(batcher("x"), batcher("y"), batcher("z")))

    model = Where()
    batcher = Batcher(model, 1, inline_under_s=1.0)  # one text a call: x and y leave others waiting
    assert asyncio.run(scenario(model, batcher)) == ["X", "Y", "Z"]
    assert model.where == ["thread", "thread", "thread", "loop"]


def test_the_batcher_knows_when_the_model_last_answered_a_text_and_a_call_of_failures_does_not_count():
    async def scenario(batcher: Batcher) -> list[bool]:
        seen = [batcher.answered_within(60)]  # nothing answered yet
        await batcher("good")
        seen.append(batcher.answered_within(60))
        batcher.answered_at -= 120  # as if that answer were two minutes old
        batcher.run = lambda texts: [ValueError("every text failed")] * len(texts)  # predict_each's failures
        await batcher("bad")
        seen.append(batcher.answered_within(60))
        batcher.run = lambda texts: 1 / 0
        await batcher("worse")
        return seen + [batcher.answered_within(60), batcher.answered_within(600)]

    assert asyncio.run(scenario(Batcher(Where(), 8))) == [False, True, False, False, True]
