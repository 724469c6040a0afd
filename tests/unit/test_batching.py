"""A replica's batcher (raybm.serve.batching): no wait when the model is idle, the texts that
arrive while it is busy share its next call, and every request gets its own answer."""

import asyncio
import threading

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
