"""Run a model over frame chunks in lock-step, so whole-video layers still see every frame.

STEM estimates one basis set per layer from the keys of *all* frames. When the UNet is run on
chunks of frames (to bound activation memory), chunk 1 reaches layer l before chunk 2 has computed
its keys for layer l. `run_lockstep` runs each chunk in its own greenlet on the caller's thread: a
chunk runs until it reaches a whole-video layer (`exchange`) and hands its tensors to the
scheduler; when every chunk has arrived, the layer's shared computation (the EM, or the gathering
of all keys for inflated attention) runs once on the concatenation of every chunk's tensors, and
each chunk goes on with the shared result. Only one chunk computes at a time, so transient memory
is that of one chunk, and the result does not depend on the chunk size.

Greenlets rather than threads: every chunk runs on the caller's thread, so it shares the caller's
CUDA library handles, grad and inference modes and current stream. Chunk threads each took a
cuBLAS handle of their own, and PyTorch gives every (handle, stream) a workspace (32 MiB on
Hopper): a 4-chunk call on the H200 held 4 more workspaces than an unchunked one. The order in
which chunks run is fixed (chunk 0 first at every layer), and no locks are needed. Sharing the
thread has one rule: a chunk must not hold a mode of its own (grad, inference, autocast) open across
a whole-video layer, or the next chunk would run in it; `exchange` refuses that.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import greenlet
import torch

_CURRENT: contextvars.ContextVar["LockStep | None"] = contextvars.ContextVar("stem_lockstep", default=None)


@dataclass
class _Arrival:
    """What a chunk hands the scheduler at a whole-video layer."""

    fn: Callable
    tensors: tuple
    dim: int


class LockStep:
    """The meeting point of the chunks of one model call."""

    def __init__(self, scheduler: greenlet.greenlet):
        self._scheduler = scheduler

    def exchange(self, fn: Callable, *tensors: torch.Tensor, dim: int = 1):
        """Concatenate `tensors` of all chunks along `dim`, run `fn` once on them, return its result.

        Called from a chunk. Every chunk must call `exchange` the same number of times in the same
        order (true for the layers of one UNet forward); `fn` must compute the same thing for every
        chunk (chunk 0's is run).
        """
        return self._scheduler.switch(_Arrival(fn, tensors, dim))


def _modes() -> tuple:
    """The thread's PyTorch modes, which every chunk shares with the caller."""
    try:
        autocast = (torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"))
    except TypeError:  # torch < 2.4
        autocast = (torch.is_autocast_cpu_enabled(), torch.is_autocast_enabled())
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), *autocast)


def current() -> LockStep | None:
    """The LockStep of the chunk we are in, or None outside a chunked call."""
    return _CURRENT.get()


def _shared(arrivals: list[_Arrival]) -> Any:
    """Run the first chunk's `fn` on the concatenation of every chunk's tensors."""
    dim = arrivals[0].dim
    whole = [torch.cat(parts, dim=dim) for parts in zip(*(a.tensors for a in arrivals))]
    return arrivals[0].fn(*whole)


def run_lockstep(fn: Callable, chunks: Sequence) -> list:
    """Call `fn(chunk)` for every chunk, each in a greenlet on this thread, meeting at every `exchange`.

    Returns the outputs in chunk order. The first error raised in a chunk or in a shared
    computation is re-raised here, after the other chunks have been unwound (their `finally`
    blocks run).
    """
    if len(chunks) == 1:
        return [fn(chunks[0])]
    scheduler = greenlet.getcurrent()
    lockstep = LockStep(scheduler)
    workers = []
    for chunk in chunks:
        context = contextvars.copy_context()  # the caller's context variables, plus ours
        context.run(_CURRENT.set, lockstep)
        worker = greenlet.greenlet(lambda c=chunk: fn(c), parent=scheduler)
        worker.gr_context = context
        workers.append(worker)

    outputs: list = [None] * len(chunks)
    reply: Any = None  # what the chunks get back from their last exchange
    modes = _modes()
    try:
        while True:
            arrivals = []
            for index, worker in enumerate(workers):
                value = worker.switch(reply) if worker else worker.switch()  # a started greenlet is truthy
                if worker.dead:
                    outputs[index] = value
                    continue
                if _modes() != modes:
                    raise RuntimeError("a lock-step chunk reached a whole-video layer inside a grad, inference or "
                                       "autocast mode of its own; enter such modes around the whole call instead")
                arrivals.append(value)
            reply = None  # every chunk has its copy; the next layer's inputs need the room
            if not arrivals:
                return outputs
            if len(arrivals) < len(workers):
                raise RuntimeError("the chunks of a lock-step call met at different numbers of whole-video layers")
            reply = _shared(arrivals)
            del arrivals
    finally:
        for worker in workers:
            if worker and not worker.dead:
                try:
                    worker.throw(greenlet.GreenletExit)  # unwind a chunk left waiting at a layer
                except BaseException:  # noqa: BLE001 - a chunk's cleanup failed; the first error is the one reported
                    pass


def whole_video(fn: Callable, *tensors: torch.Tensor, dim: int = 1):
    """Run `fn` on the tensors of the whole video: directly, or once across the chunks of a lock-step call."""
    lockstep = current()
    if lockstep is None:
        return fn(*tensors)
    return lockstep.exchange(fn, *tensors, dim=dim)
