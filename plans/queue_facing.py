"""The lab's plans as bluesky-queueserver sees them: parameters a user can type as JSON values.

The queue server builds a pydantic model from each plan's signature. Our plans annotate some
parameters with objects no client can send (an EigerCalibration, a GemLayer, a Path, the tiled
catalog), and `from __future__ import annotations` leaves every annotation a string the server cannot
resolve. `queue_facing(plan)` returns the same plan under the same name with a signature the server
understands:

- device parameters (annotated with an ophyd Device class, or not annotated) carry no annotation, so
  the server turns a device name ('layer', 'det', 'box.voltage') into the device;
- Path becomes str (the plans build the Path themselves);
- parameters of internal types (calibration state, analysis defaults, callables) are left out of the
  signature: the plan builds them from its defaults; a value may still be passed at the prompt;
- session objects (`catalog`) are filled from the session that built the wrapper;
- run by the queue server's worker, the plan's return value is recorded as a run of the item
  (plans/plan_result.py), so `calbench queue result` can show it.

Calling the wrapper with everything the plan accepts still works, so the prompt and the queue run
the same objects.
"""
from __future__ import annotations

import functools
import inspect
import types
import typing
from collections import abc
from pathlib import PurePath

from calbench.plans.plan_result import record_result

JSON_TYPES = (int, float, str, bool, type(None), dict, list, tuple)
JSON_GENERICS = {typing.Union, types.UnionType, typing.Literal, list, tuple, dict, abc.Sequence,
                 abc.Iterable, abc.Mapping, abc.Collection}


def _in_queue_worker() -> bool:
    from bluesky_queueserver import is_re_worker_active
    return bool(is_re_worker_active())


class MissingSessionObject(RuntimeError):
    """A plan needs an object of the session (e.g. the tiled catalog) that the session lacks."""


def _is_device_class(t) -> bool:
    from bluesky import protocols
    from ophyd import Device, Signal
    return isinstance(t, type) and (issubclass(t, (Device, Signal)) or (
        getattr(t, "__module__", "") == protocols.__name__ and getattr(t, "_is_protocol", False)))


def _mentions_device(t) -> bool:
    return _is_device_class(t) or any(_mentions_device(a) for a in typing.get_args(t))


def _members(t) -> tuple:
    """The alternatives of a Union (or the type itself)."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return typing.get_args(t)
    return (t,)


def _is_json(t) -> bool:
    if t is typing.Any or t in JSON_TYPES:
        return True
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return True
    if origin in JSON_GENERICS:
        return all(_is_json(a) for a in typing.get_args(t) if a is not Ellipsis)
    return False


def _queue_annotation(hint):
    """(kind, annotation): kind 'json' (annotation for the server), 'device' (no annotation) or
    'internal' (hidden)."""
    if hint is inspect.Parameter.empty:
        return "device", inspect.Parameter.empty
    if _mentions_device(hint):
        return "device", inspect.Parameter.empty
    members = _members(hint)
    if any(isinstance(m, type) and issubclass(m, PurePath) for m in members):
        rest = [m for m in members if not (isinstance(m, type) and issubclass(m, PurePath))]
        hint = functools.reduce(lambda a, b: a | b, {str, *rest})
        members = _members(hint)
    if _is_json(hint):
        return "json", hint
    return "internal", None


def _resolved_hints(plan) -> dict:
    try:
        return typing.get_type_hints(plan)
    except Exception:          # a name only importable for type checkers: leave such plans as they are
        return {}


def _device_classes(hint) -> tuple:
    return tuple(m for m in _members(hint) if _is_device_class(m))


def queue_facing(plan, devices: dict | None = None, **session_objects):
    """`plan` under its own name with a signature of JSON values and devices (see the module's
    docstring). `session_objects` fill parameters of that name (e.g. catalog=cat) when not given.
    `devices` (name -> device) lists, for a parameter annotated with a device class, the devices
    of that class the queue accepts: another name is refused at submission, naming the parameter."""
    sig = inspect.signature(plan)
    hints = _resolved_hints(plan)
    params, custom = [], {}
    # after a hidden positional parameter the queue must pass the rest by keyword: positions
    # in the queue's signature would otherwise land in the plan's hidden slot
    by_keyword = False

    def hide(p):
        nonlocal by_keyword
        by_keyword = by_keyword or p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)

    for p in sig.parameters.values():
        if p.name.startswith("_") or p.name in session_objects:
            hide(p)
            continue
        if by_keyword and p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL):
            raise TypeError(f"{plan.__name__}: '{p.name}' follows a hidden positional parameter")
        if by_keyword and p.kind == p.POSITIONAL_OR_KEYWORD:
            p = p.replace(kind=p.KEYWORD_ONLY)
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            params.append(p.replace(annotation=inspect.Parameter.empty))
            continue
        hint = hints.get(p.name, inspect.Parameter.empty)
        kind, annotation = _queue_annotation(hint)
        classes = _device_classes(hint) if kind == "device" and devices else ()
        if classes:
            names = sorted(n for n, d in devices.items() if isinstance(d, classes))
            if names:
                enum = f"{p.name}_devices"
                optional = type(None) in _members(hint)
                custom[p.name] = {"annotation": f"typing.Optional[{enum}]" if optional else enum,
                                  "devices": {enum: names}}
        if kind == "internal":
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{plan.__name__}: parameter '{p.name}' ({hints.get(p.name)}) has no "
                                "JSON form and no default; pass it as a session object")
            hide(p)
            continue
        params.append(p.replace(annotation=annotation))
    queue_sig = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)

    @functools.wraps(plan)
    def wrapper(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        for name, value in session_objects.items():
            if name in bound.arguments:
                continue
            if value is None and sig.parameters[name].default is inspect.Parameter.empty:
                raise MissingSessionObject(
                    f"{plan.__name__} needs the session's {name}, and this session has none: start "
                    "tiled (`calbench tiled start`) and reopen the environment (qserver environment "
                    "close; qserver environment open)")
            bound.arguments[name] = value
        result = yield from plan(*bound.args, **bound.kwargs)
        if _in_queue_worker():      # the queue keeps only run uids: the result becomes a run
            yield from record_result(plan.__name__, result)
        return result

    wrapper.__signature__ = queue_sig
    if custom:        # read by bluesky-queueserver, as set by its parameter_annotation_decorator
        wrapper._custom_parameter_annotation_ = {"parameters": custom}
    wrapper.__wrapped_plan__ = plan
    del wrapper.__wrapped__          # inspect.signature must not look through to the plan's own
    wrapper.__annotations__ = {p.name: p.annotation for p in params
                               if p.annotation is not inspect.Parameter.empty}
    return wrapper


def queue_facing_plans(namespace: dict, modules: tuple[str, ...] = ("calbench.plans",),
                       names: tuple[str, ...] = ("list_scan",), **session_objects) -> dict:
    """Queue-facing versions of every plan in `namespace` defined in `modules`, and of the plans
    `names` (bluesky's list_scan: the server cannot validate its `*args` annotation), under the
    same names. bluesky's other plans are queue-friendly as they are."""
    from ophyd import Device
    devices = {n: d for n, d in namespace.items() if isinstance(d, Device) and not n.startswith("_")}
    out = {}
    for name, obj in namespace.items():
        if (callable(obj) and inspect.isgeneratorfunction(obj) and not name.startswith("_")
                and (getattr(obj, "__module__", "").startswith(modules) or name in names)
                and not hasattr(obj, "__wrapped_plan__")):
            wanted = {k: v for k, v in session_objects.items()
                      if k in inspect.signature(obj).parameters}
            out[name] = queue_facing(obj, devices, **wanted)
    return out
