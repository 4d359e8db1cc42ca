"""Learning tasks by name. Modules are imported only when their task is asked for, so a
device that runs digits never imports the detection stack.

A task is named by one of (all resolved by :func:`resolve_task`, wherever a task name is taken:
``EdgeClient(task=...)``, ``edgeci coordinator --model``, ``edgeci device --dataset``,
``edgeci pretrain --model``, an emulator scenario's ``task =``):

* a built-in task's registry name or model id (``digits``, ``gesture-cnn1d``);
* an import path ``package.module:Name`` to an app's own task: ``Name`` is either a
  :class:`~edge_sdk.tasks.registry.TaskInfo` (importable without torch, so a ``[device]``
  install can serve it) or the task's factory (a class or function) carrying its
  ``TaskInfo`` as the attribute ``info``;
* the name of a Python entry point in the group ``edgeci.tasks`` (``[project.entry-points."edgeci.tasks"]``
  ``acme-parts = "acme_vision.info:TASK"``) whose value is such an import path.

Importing a module named on the command line or in a scenario file is code execution by
design (the operator's own flags); a task reference never comes off the wire: devices and
coordinators only compare the model ids and spec fingerprints that messages carry.

Adding a built-in task: its module, and its TaskInfo in
:data:`edge_sdk.tasks.registry.TASK_INFO`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge_sdk.errors import ConfigError
from edge_sdk.tasks.base import Split, Task, TaskData, TrainConfig, TrainResult

if TYPE_CHECKING:
    from edge_sdk.tasks.registry import TaskInfo

__all__ = [
    "ENTRY_POINT_GROUP",
    "TASKS",
    "Split",
    "Task",
    "TaskData",
    "TrainConfig",
    "TrainResult",
    "entry_point_task",
    "get_task",
    "known_tasks",
    "resolve_task",
    "task_factory",
    "task_name",
]

ENTRY_POINT_GROUP = "edgeci.tasks"
"""The entry point group an installed package declares its tasks in (name -> ``module:Name``)."""

_IMPORT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _factories() -> dict[str, str]:
    """Registry name -> ``"module.path:ClassName"``, read from the one registry (helper-99: a task
    added to a list here got D_min 16 and a contract without a range silently, and one declared
    in the registry only could not be loaded). Imported lazily: the registry imports this
    package's modules, and ``python -m edge_sdk.tasks.registry`` runs it as ``__main__``."""
    from edge_sdk.tasks.registry import TASK_INFO

    return {name: info.factory for name, info in TASK_INFO.items()}


def __getattr__(name: str) -> Any:
    if name == "TASKS":  # (read-only view, kept for callers of the former dict)
        return _factories()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def known_tasks() -> tuple[str, ...]:
    """Registered task names, sorted."""
    return tuple(sorted(_factories()))


def _builtin(name: str) -> TaskInfo | None:
    """The built-in declaration registered as ``name`` or whose model id ``name`` is."""
    from edge_sdk.tasks.registry import TASK_INFO

    if name in TASK_INFO:
        return TASK_INFO[name]
    return next((info for info in TASK_INFO.values() if info.model_id == name), None)


def _import_attr(path: str, ref: str) -> Any:
    """The object ``module:attr.sub`` names; ConfigError saying what is missing."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"task {ref!r}: no module {exc.name!r} (is its package installed, or on PYTHONPATH?)") from exc
        from edge_sdk._extras import EXTRA_OF, missing

        top = (exc.name or "").split(".", 1)[0]
        if top in EXTRA_OF:  # (torch on a [device] install: name the task's TaskInfo instead, importable without it)
            raise missing(top, purpose=f"importing {module_name} (task {ref!r}; on an install without {top}, name "
                                       "a TaskInfo in a module that does not import it)", cause=exc) from exc
        raise ConfigError(f"task {ref!r}: importing {module_name} failed: {exc}") from exc
    found: Any = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ConfigError(f"task {ref!r}: module {module_name} has no {attr!r}") from None
    return found


def _declared(path: str, ref: str) -> TaskInfo:
    """The TaskInfo an import path names, itself or as its factory's ``info``."""
    from edge_sdk.tasks.registry import TASK_INFO, TaskInfo

    found = _import_attr(path, ref)
    if isinstance(found, TaskInfo):
        info = found
        if not info.factory:
            raise ConfigError(f"task {ref!r}: its TaskInfo names no factory (factory='package.module:Class')")
    else:
        own = getattr(found, "info", None)
        if not isinstance(own, TaskInfo):
            raise ConfigError(f"task {ref!r}: {path} has no TaskInfo: give it the class attribute "
                              f"`info = TaskInfo(name=..., model_id=..., ...)` (edge_sdk.tasks.registry.TaskInfo), "
                              f"got {type(own).__name__ if own is not None else 'no attribute info'}")
        info = own
        if not callable(found):
            raise ConfigError(f"task {ref!r}: {path} is a {type(found).__name__}, not a task factory (a class or function)")
        if info.factory != path:  # (the factory named is the one that builds it)
            info = dataclasses.replace(info, factory=path)
    if not _IMPORT_PATH.fullmatch(info.factory):
        raise ConfigError(f"task {ref!r}: its TaskInfo's factory {info.factory!r} is not 'package.module:Name'")
    clash = _builtin(info.name) or _builtin(info.model_id) or next(
        (b for b in TASK_INFO.values() if info.task_name in (b.task_name, b.name)), None)
    if clash is not None:  # a device would take its declaration for the built-in one
        raise ConfigError(f"task {ref!r}: its name, task name or model id ({info.name!r}, {info.task_name!r}, "
                          f"{info.model_id!r}) is the built-in task {clash.name!r}'s: give it its own")
    return info


def entry_point_task(name: str) -> str | None:
    """The value (``module:Name``) of the ``edgeci.tasks`` entry point called ``name``."""
    from importlib import metadata

    values = {ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)}
    if len(values) > 1:
        raise ConfigError(f"task {name!r}: several installed packages declare it ({', '.join(sorted(values))})")
    return next(iter(values), None)


def resolve_task(ref: str) -> TaskInfo:
    """The declaration of the task ``ref`` names: a built-in task's name or model id, an import
    path ``package.module:Name``, or an ``edgeci.tasks`` entry point's name (see the module
    docstring). The one place a task name becomes a task; ConfigError saying what is missing.
    Imports the module an import path or entry point names (the operator's own code), never the
    task's torch half."""
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"a task is named by a string, got {ref!r}")
    info = _builtin(ref)
    if info is not None:
        return info
    if ":" in ref:
        if not _IMPORT_PATH.fullmatch(ref):
            raise ConfigError(f"task {ref!r}: an import path is 'package.module:Name' (Python identifiers)")
        return _declared(ref, ref)
    path = entry_point_task(ref)
    if path is not None:
        if not _IMPORT_PATH.fullmatch(path):
            raise ConfigError(f"task {ref!r}: its {ENTRY_POINT_GROUP} entry point is {path!r}, not 'package.module:Name'")
        return _declared(path, ref)
    from edge_sdk.tasks.registry import TASK_INFO

    models = ", ".join(f"{info.model_id} ({info.name})" for info in TASK_INFO.values())
    raise ConfigError(f"unknown task {ref!r}; known tasks: {', '.join(known_tasks())} (or their models: {models}), "
                      f"an import path package.module:Name, or an {ENTRY_POINT_GROUP} entry point")


def task_name(name: str) -> str:
    """The registered task ``name`` names: itself, or the task whose model it is (its model id,
    as logs and ``edgeci status`` show it: ``gesture-cnn1d`` is ``gestures``); an app's own
    task (an import path or entry point, :func:`resolve_task`) is named by ``name`` itself."""
    info = resolve_task(name)
    return info.name if _builtin(name) is not None else name


def get_task(name: str, **kwargs: Any) -> Task:
    """A new instance of the task ``name`` names (:func:`resolve_task`); ``kwargs`` go to its
    constructor (``device=`` for the torch tasks)."""
    info = resolve_task(name)
    if _builtin(name) is not None:
        module_name, _, class_name = info.factory.partition(":")
        built: Task = getattr(importlib.import_module(module_name), class_name)(**kwargs)
        return built
    task = task_factory(name)(**kwargs)
    _check_built(name, info, task)
    return task


def task_factory(name: str) -> Callable[..., Task]:
    """The class or function that builds the task ``name`` names (imported: a built-in one's
    may raise MissingExtra on an install without torch)."""
    info = resolve_task(name)
    factory = _import_attr(info.factory, name)
    if not callable(factory):
        raise ConfigError(f"task {name!r}: its factory {info.factory} is a {type(factory).__name__}, not a class or function")
    return factory  # type: ignore[no-any-return]


def _check_built(ref: str, info: TaskInfo, task: Any) -> None:
    """ConfigError unless an app's task is the one its TaskInfo declares (its name, spec and
    input shape): devices would store, train and serve by a declaration that is not its model."""
    spec = getattr(task, "spec", None)
    model_id = getattr(spec, "model_id", None)
    problems = []
    if getattr(task, "name", None) != info.task_name:
        problems.append(f"its name is {getattr(task, 'name', None)!r}, the TaskInfo's task_name {info.task_name!r}")
    if model_id != info.model_id:
        problems.append(f"its spec's model id is {model_id!r}, the TaskInfo's {info.model_id!r}")
    shape = getattr(task, "input_shape", None)
    if info.contract is not None and shape is not None and tuple(shape) != info.contract.shape:
        problems.append(f"its input shape is {tuple(shape)}, the TaskInfo's contract {info.contract.shape}")
    from edge_sdk.tasks.registry import TaskInfo

    own = getattr(task, "info", None)
    if isinstance(own, TaskInfo) and dataclasses.replace(own, factory=info.factory) != info:
        problems.append("it carries another TaskInfo than the one named")
    if problems:
        raise ConfigError(f"task {ref!r}: {info.factory} built a task unlike its TaskInfo: {'; '.join(problems)}")
