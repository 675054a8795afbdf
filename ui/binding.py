"""Connects name-keyed handlers to Gradio: handlers return {"result": ..., "session": ...}; Gradio wants
{component: value}. Keeping names in the handlers lets tests call them without building any component."""
from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping

import gradio as gr


def bind(handler: Callable, outputs: Mapping[str, gr.components.Component], *bound, **bound_kw) -> Callable:
    """`handler` with leading arguments bound, translating its returned (or yielded) name-keyed dicts to
    component-keyed ones for `outputs`. The signature Gradio inspects (keyword inputs, gr.Progress) is kept."""
    fn = functools.partial(handler, *bound, **bound_kw) if bound or bound_kw else handler

    def translate(values: Mapping[str, object]) -> dict:
        unknown = set(values) - set(outputs)
        if unknown:
            raise KeyError(f"{handler.__name__} returned outputs that are not wired: {sorted(unknown)}")
        return {outputs[name]: value for name, value in values.items()}

    if inspect.isasyncgenfunction(handler):
        async def wrapper(*args, **kwargs):
            async for values in fn(*args, **kwargs):
                yield translate(values)
    elif inspect.iscoroutinefunction(handler):
        async def wrapper(*args, **kwargs):
            return translate(await fn(*args, **kwargs))
    elif inspect.isgeneratorfunction(handler):
        def wrapper(*args, **kwargs):
            for values in fn(*args, **kwargs):
                yield translate(values)
    else:
        def wrapper(*args, **kwargs):
            return translate(fn(*args, **kwargs))

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    wrapper.__signature__ = inspect.signature(fn)
    try:  # Gradio finds gr.SelectData / gr.Progress parameters through the type hints
        wrapper.__annotations__ = typing.get_type_hints(handler)
    except (NameError, TypeError):
        wrapper.__annotations__ = dict(getattr(handler, "__annotations__", {}))
    return wrapper


def components(outputs: Mapping[str, gr.components.Component], *names: str) -> list:
    """The components for `names`, in order, for an event's `outputs=`."""
    return [outputs[name] for name in names]
