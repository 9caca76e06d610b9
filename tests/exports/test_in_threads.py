"""``_in_threads``: chunks converted in worker threads while the next is read, in order, one at a time."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

import pytest

from exports.pipeline import _in_threads


async def numbers(count: int, read: list[int]) -> AsyncIterator[int]:
    for i in range(count):
        await asyncio.sleep(0)
        read.append(i)
        yield i


async def test_results_in_order_one_work_at_a_time_next_chunk_read_meanwhile() -> None:
    running = 0
    most = 0
    lock = threading.Lock()
    read: list[int] = []
    seen_when_done: list[int] = []

    def work(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        seen_when_done.append(len(read))
        return i * 10

    out = [r async for r in _in_threads(numbers(6, read), work)]
    assert out == [0, 10, 20, 30, 40, 50]
    assert most == 1
    # While chunk i was converted, chunk i + 1 had been read already (except for the last one).
    assert seen_when_done[:-1] == [2, 3, 4, 5, 6]


async def test_an_error_is_raised_and_a_running_work_is_waited_for() -> None:
    finished: list[int] = []

    def work(i: int) -> int:
        if i == 2:
            raise ValueError("bad chunk")
        time.sleep(0.05)
        finished.append(i)
        return i

    got: list[int] = []

    async def consume() -> None:
        async with contextlib.aclosing(_in_threads(numbers(5, []), work)) as results:
            async for r in results:
                got.append(r)

    with pytest.raises(ValueError, match="bad chunk"):
        await consume()
    assert got == [0, 1]
    assert 3 not in finished  # no work starts after the failed one


async def test_closing_early_waits_for_the_running_work() -> None:
    finished: list[int] = []

    def work(i: int) -> int:
        time.sleep(0.05)
        finished.append(i)
        return i

    async with contextlib.aclosing(_in_threads(numbers(5, []), work)) as results:
        async for r in results:
            assert r == 0
            break
    assert finished == [0, 1]  # chunk 1 was running when the consumer stopped: it ended before the close
