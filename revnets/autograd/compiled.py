"""The functions of a reversible stack compiled with the model's own ``torch.compile`` backend.

Dynamo cannot trace the reversible strategy itself (random-number snapshots, a backward that inverts
layers in Python), so :func:`~revnets.autograd.reversible.run_reversible` runs eagerly: ``torch.compile``
breaks the graph there, once per stack. What the stack calls need not run eagerly: while Dynamo traces
the strategy, :func:`outer_backend` reads the backend the model is being compiled with, and the engine
then calls every function through :func:`function_caller`, one ``torch.compile`` of a call trampoline with
that backend. The forward, the backward's re-evaluations and their vector-Jacobian products (autograd
through the compiled graphs) all run compiled code; functions of one structure share one graph per grad
mode, since Dynamo inlines modules and treats their parameters as inputs.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

_BACKENDS: dict[int, Any] = {}
"""The backends :func:`outer_backend` met, by key (kept alive: a key stays valid for the process)."""


@torch._dynamo.assume_constant_result
def outer_backend() -> int | None:
    """The key (for :func:`function_caller`) of the backend the frame Dynamo is tracing is compiled with,
    read once at trace time and baked into the graph as a constant; ``None`` where torch's internals differ
    from what this reads (the functions then run eagerly, with a warning)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        compiler = InstructionTranslator.current_tx().output.compiler_fn
        backend = getattr(compiler, "_torchdynamo_orig_backend", compiler)
    except (ImportError, AttributeError, AssertionError) as error:
        warnings.warn(f"revnets: cannot read the torch.compile backend ({type(error).__name__}: {error}); a "
                      "reversible stack's functions run eagerly under torch.compile", RuntimeWarning, stacklevel=2)
        return None
    key = id(backend)
    _BACKENDS.setdefault(key, backend)
    return key


def call_function(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``: the trampoline :func:`function_caller` compiles."""
    return function(*args, **kwargs)


@functools.cache
def function_caller(key: int, kind: type) -> Callable[..., Any]:
    """``call(function, *args, **kwargs)`` for functions of type ``kind``, compiled with the backend of
    ``key`` (:func:`outer_backend`). Each type gets its own copy of the trampoline, so its own cache of
    graphs: the recompilation limit of Dynamo counts the graphs of one type, not of the whole model."""
    code = call_function.__code__.replace(co_name=f"call_{kind.__name__}", co_qualname=f"call_{kind.__qualname__}")
    trampoline = types.FunctionType(code, call_function.__globals__, code.co_name)
    return torch.compile(trampoline, backend=_BACKENDS[key])
