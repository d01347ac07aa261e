"""Lock-step chunks: one shared computation per layer, on the caller's thread, errors unwound."""

import contextvars
import threading

import pytest
import torch

from stem.lockstep import current, run_lockstep, whole_video

LAYERS = 3


def toy_model(x: torch.Tensor, log: list) -> torch.Tensor:
    """Three 'layers', each adding the mean over all frames (dim 0) of its input: a whole-video op."""
    for layer in range(LAYERS):
        mean = whole_video(lambda whole: (log.append((layer, whole.shape[0])), whole.mean(0))[1], x, dim=0)
        x = x + mean
    return x


def test_chunks_equal_the_whole_call_with_one_shared_computation_per_layer():
    x = torch.randn(7, 5, dtype=torch.float64)
    whole_log, chunk_log = [], []
    whole = toy_model(x, whole_log)
    outputs = run_lockstep(lambda c: toy_model(c, chunk_log), list(x.split(3)))  # chunks of 3, 3, 1
    torch.testing.assert_close(torch.cat(outputs), whole, rtol=0, atol=1e-12)
    assert chunk_log == whole_log == [(layer, 7) for layer in range(LAYERS)]


def test_chunks_run_on_the_callers_thread_with_its_modes_and_context():
    """Same thread: the caller's CUDA handles (no per-thread cuBLAS workspace), grad mode and context variables."""
    var = contextvars.ContextVar("caller_var", default="unset")
    var.set("the caller's")
    seen = []

    def chunk(c):
        seen.append((threading.get_ident(), torch.is_grad_enabled(), torch.is_inference_mode_enabled(), var.get(),
                     current() is not None))
        whole_video(lambda w: w.sum(), c, dim=0)
        return c

    with torch.inference_mode():
        run_lockstep(chunk, list(torch.arange(4.0).split(2)))
    assert seen == [(threading.get_ident(), False, True, "the caller's", True)] * 2
    assert current() is None  # outside a chunked call again


def test_an_error_in_a_chunk_unwinds_the_others_and_surfaces_in_the_caller():
    started, unwound = [], []

    def chunk(c):
        started.append(int(c[0]))
        try:
            if c[0] == 2:
                raise ValueError("bad chunk")
            return whole_video(lambda w: w.sum(), c, dim=0)
        finally:
            unwound.append(int(c[0]))

    with pytest.raises(ValueError, match="bad chunk"):
        run_lockstep(chunk, list(torch.arange(6.0).split(2)))  # chunks start 0, 2, 4
    assert started == [0, 2]  # chunk 4 never starts
    assert sorted(unwound) == [0, 2]  # chunk 0, waiting at the layer, was unwound


def test_an_error_in_the_shared_computation_surfaces_in_the_caller():
    unwound = []

    def shared(_whole):
        raise RuntimeError("CUDA out of memory (simulated)")

    def chunk(c):
        try:
            return whole_video(shared, c, dim=0)
        finally:
            unwound.append(int(c[0]))

    with pytest.raises(RuntimeError, match="simulated"):
        run_lockstep(chunk, list(torch.arange(4.0).split(2)))
    assert sorted(unwound) == [0, 2]


def test_chunks_that_meet_at_different_layers_are_refused():
    def chunk(c):
        if c[0] == 0:
            whole_video(lambda w: w.sum(), c, dim=0)
        return c

    with pytest.raises(RuntimeError, match="different numbers of whole-video layers"):
        run_lockstep(chunk, list(torch.arange(4.0).split(2)))


def test_a_chunk_holding_its_own_grad_mode_across_a_layer_is_refused_and_the_callers_mode_kept():
    """Chunks share the thread's modes: one that stays inside `no_grad` at a layer would leak it to the next."""

    def chunk(c):
        with torch.no_grad():
            return whole_video(lambda w: w.sum(), c, dim=0)

    with pytest.raises(RuntimeError, match="grad, inference or autocast mode of its own"):
        run_lockstep(chunk, list(torch.arange(4.0).split(2)))
    assert torch.is_grad_enabled()  # the refused chunk was unwound and its `with` restored the mode


def test_a_failing_cleanup_does_not_hide_the_first_error_or_leave_chunks_waiting():
    unwound = []

    def chunk(c):
        try:
            if c[0] == 4:
                raise ValueError("the first error")
            return whole_video(lambda w: w.sum(), c, dim=0)
        finally:
            unwound.append(int(c[0]))
            if c[0] == 0:
                raise OSError("a cleanup that fails")

    with pytest.raises(ValueError, match="the first error"):
        run_lockstep(chunk, list(torch.arange(6.0).split(2)))  # chunks 0 and 2 wait at the layer when 4 fails
    assert sorted(unwound) == [0, 2, 4]
