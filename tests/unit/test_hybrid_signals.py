"""The hybrid worker's signal table (``serving.signals.HYBRID``) installed on a real event
loop: the loop's steps as its callbacks, the rest as ``install`` does; everything restored."""

from __future__ import annotations

import asyncio
import os
import signal

from forkserve.serving.signals import HYBRID, Step, install_on_loop, restore


def test_install_on_loop_puts_the_loop_steps_on_the_loop_and_the_rest_in_place() -> None:
    loop = asyncio.new_event_loop()
    seen: list[Step] = []
    on_loop = {step: (lambda step=step: seen.append(step))
               for step in (Step.FINISH, Step.REOPEN, Step.LOOK_AGAIN, Step.GIVE_WAY)}

    def quit_now(signum: int, frame: object) -> None:
        pass  # never delivered: the test only reads the disposition

    others = [row.signal for row in HYBRID if row.step not in on_loop]
    before = {sig: signal.getsignal(sig) for sig in others}
    previous: dict[int, object] = {}
    try:
        previous = install_on_loop(HYBRID, loop, on_loop, {Step.QUIT: quit_now})
        assert signal.getsignal(signal.SIGQUIT) is quit_now
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGABRT) == signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGUSR1)  # REOPEN: recorded by the loop, run on it
        os.kill(os.getpid(), signal.SIGWINCH)  # GIVE_WAY
        loop.run_until_complete(asyncio.sleep(0.05))
        assert seen == [Step.REOPEN, Step.GIVE_WAY]
    finally:
        for row in HYBRID:
            if row.step in on_loop:
                loop.remove_signal_handler(row.signal)
        loop.close()
        restore(previous)
    assert {sig: signal.getsignal(sig) for sig in others} == before
