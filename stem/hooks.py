"""Module hooks installed by submodule name and removed by a context manager (no patched `forward`s).

The counterpart of `attention.processors_installed` for what is not an attention processor: PnP's
conv injection (a forward hook that rewrites a conv's output) and FreeU (forward pre-hooks that
rewrite a resnet's input).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def hooks_installed(module: torch.nn.Module, hooks: dict[str, Callable], *, pre: bool = False,
                    with_kwargs: bool = False) -> Iterator[dict[str, torch.nn.Module]]:
    """Register `hooks[name]` on `module.get_submodule(name)` for every name; remove them all on exit.

    Args:
        module: the model (a UNet).
        hooks: submodule name -> hook. A forward hook `hook(module, args, output) -> output | None`,
            or with `pre` a forward pre-hook `hook(module, args) -> args | None`; with `with_kwargs`
            they also take (and a pre-hook returns) the keyword arguments, as
            `torch.nn.Module.register_forward_pre_hook(with_kwargs=True)` describes.
        pre: pre-hooks (rewrite the input) instead of forward hooks (rewrite the output).
        with_kwargs: pass the keyword arguments too.

    Yields:
        The hooked submodules by name. Every name is resolved before anything is registered, so an
        unknown name (AttributeError) leaves the model untouched.
    """
    targets = {name: module.get_submodule(name) for name in hooks}
    handles = []
    try:
        for name, hook in hooks.items():
            register = targets[name].register_forward_pre_hook if pre else targets[name].register_forward_hook
            handles.append(register(hook, with_kwargs=with_kwargs))
        yield targets
    finally:
        for handle in handles:
            handle.remove()
