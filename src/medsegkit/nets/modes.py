"""Switching a network to eval mode for a while without losing the modes its modules had."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["evaluating"]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` and all its submodules in eval mode inside the block; afterwards every module gets back
    its own ``training`` flag.

    ``model.train(was_training)`` would not do: it sets every submodule to the top module's mode, so a
    model being fine-tuned with frozen BatchNorm layers (``bn.eval()`` inside a training model) would
    come back with those layers updating their running statistics again.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
