"""Run a model over frame chunks in lock-step, so whole-video layers still see every frame.

STEM estimates one basis set per layer from the keys of *all* frames. When the UNet is run on
chunks of frames (to bound activation memory), chunk 1 reaches layer l before chunk 2 has computed
its keys for layer l. `run_lockstep` runs one thread per chunk; at each whole-video layer the
threads meet (`exchange`), the layer's shared computation (the EM, or the gathering of all keys for
inflated attention) runs once on the concatenation of every chunk's tensors, and each chunk goes
on with the shared result. A baton lets only one chunk compute at a time, so transient memory is
that of one chunk, and the result does not depend on the chunk size.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import torch


class LockStep:
    """The meeting point of the chunk threads of one model call."""

    def __init__(self, num_chunks: int):
        self.num_chunks = num_chunks
        self._baton = threading.Lock()
        self._barrier = threading.Barrier(num_chunks, action=self._reduce)
        self._local = threading.local()
        self._inputs: list = [None] * num_chunks
        self._fn: Callable | None = None
        self._result = None
        self._sizes: list[int] = []

    # -- called from the chunk threads -------------------------------------------------------
    def exchange(self, fn: Callable, *tensors: torch.Tensor, dim: int = 1):
        """Concatenate `tensors` of all chunks along `dim`, run `fn` once on them, return its result.

        Every chunk must call `exchange` the same number of times in the same order (true for
        the layers of one UNet forward). `fn` must return the same thing for every chunk.
        """
        index = self._local.index
        self._inputs[index] = (tensors, dim)
        self._fn = fn
        self._baton.release()
        try:
            self._barrier.wait()
        finally:
            self._baton.acquire()
        return self._result

    def _reduce(self):
        """Barrier action, run by one thread while all others wait."""
        dim = self._inputs[0][1]
        columns = zip(*(tensors for tensors, _ in self._inputs))
        whole = [torch.cat(parts, dim=dim) for parts in columns]
        self._result = self._fn(*whole)
        self._inputs = [None] * self.num_chunks

    def _run(self, index: int, fn: Callable, chunk, outputs: list, errors: list, grad: bool):
        self._local.index = index
        self._baton.acquire()
        try:
            with torch.set_grad_enabled(grad):  # grad mode is thread-local
                outputs[index] = fn(chunk)
        except threading.BrokenBarrierError:
            pass  # another chunk failed; its error is the one reported
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(error)
            self._barrier.abort()
        finally:
            self._baton.release()


_current = threading.local()


def current() -> LockStep | None:
    """The LockStep of the chunk thread we are in, or None outside a chunked call."""
    return getattr(_current, "lockstep", None)


def run_lockstep(fn: Callable, chunks: Sequence) -> list:
    """Call `fn(chunk)` for every chunk, one thread each, meeting at every `exchange`.

    Returns the outputs in chunk order; the first error raised in any chunk is re-raised here.
    """
    if len(chunks) == 1:
        return [fn(chunks[0])]
    lockstep = LockStep(len(chunks))
    outputs: list = [None] * len(chunks)
    errors: list = []
    grad = torch.is_grad_enabled()

    def body(index, chunk):
        _current.lockstep = lockstep
        lockstep._run(index, fn, chunk, outputs, errors, grad)

    threads = [threading.Thread(target=body, args=(i, c), daemon=True) for i, c in enumerate(chunks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return outputs


def whole_video(fn: Callable, *tensors: torch.Tensor, dim: int = 1):
    """Run `fn` on the tensors of the whole video: directly, or once across the chunks of a lock-step call."""
    lockstep = current()
    if lockstep is None:
        return fn(*tensors)
    return lockstep.exchange(fn, *tensors, dim=dim)
