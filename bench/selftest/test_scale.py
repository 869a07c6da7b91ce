"""The event-loop measurements of bench/scale.py."""

from __future__ import annotations

import asyncio
import time

from bench import scale


class LoudRepr:
    """An argument whose repr() must not be called while callbacks are timed."""

    calls = 0

    def __repr__(self) -> str:
        LoudRepr.calls += 1
        return "LoudRepr()"


def test_callbacks_are_timed_and_named_without_repr_of_their_arguments() -> None:
    """The timer names the slowest callbacks (functions, tasks) and renders no argument.

    repr(handle) rendered a future's result: the daemon's whole configuration,
    145 ms on the event loop for 1,000 accounts.
    """
    timer = scale.CallbackTimer()
    LoudRepr.calls = 0

    # Both take longer than any other callback of the run, so both are kept.
    def plain(_: object) -> None:
        time.sleep(0.05)

    async def waiter(future: asyncio.Future[object]) -> object:
        result = await future
        time.sleep(0.05)  # noqa: ASYNC251 -- a callback that holds the loop, on purpose
        return result

    async def main() -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        task = asyncio.create_task(waiter(future), name="the-waiter")
        loop.call_soon(plain, LoudRepr())
        await asyncio.sleep(0)
        future.set_result(LoudRepr())
        await task

    timer.install()
    try:
        asyncio.run(main())
    finally:
        timer.uninstall()
    names = [what for _, what in timer.slowest]
    assert LoudRepr.calls == 0
    assert any(what.endswith("plain") for what in names), names
    assert any(what.startswith("task the-waiter") for what in names), names
    assert asyncio.events.Handle._run is timer._original
