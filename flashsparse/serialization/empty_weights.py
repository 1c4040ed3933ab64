"""Building a model without allocating its weights, keeping the buffers ``__init__`` computes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with their parameters on the ``meta`` device and their buffers real.

    For checkpoints that do not store non-persistent buffers (a Hugging Face checkpoint has no
    rotary ``inv_freq``): ``with empty_weights(): model = AutoModelForCausalLM.from_config(c)``
    allocates no weight memory (a parameter is moved to ``meta`` as it is registered, before any
    initialisation touches it) while buffers computed in ``__init__`` keep their values.
    Files written by :func:`save_sparse` hold every buffer, so ``torch.device("meta")`` is
    enough for them.
    """
    register = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is None or param.device.type == "meta":
            return
        if type(param) is nn.Parameter:
            moved = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            moved.__dict__.update(param.__dict__)
        else:  # a Parameter subclass takes its attributes as constructor arguments
            moved = type(param)(
                param.to("meta"), **{**param.__dict__, "requires_grad": param.requires_grad}
            )
        self._parameters[name] = moved

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = register
