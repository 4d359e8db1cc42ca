"""Learning tasks by name. Modules are imported only when their task is asked for, so a
device that runs digits never imports the detection stack.

Adding a task: its module, and its :class:`~edge_sdk.tasks.registry.TaskInfo` in
:data:`edge_sdk.tasks.registry.TASK_INFO` (its factory ``"module.path:ClassName"``, sample
kind, input contract, D_min and training defaults): :data:`TASKS` is read from there.
"""

from __future__ import annotations

import importlib
from typing import Any

from edge_sdk.errors import ConfigError
from edge_sdk.tasks.base import Split, Task, TaskData, TrainConfig, TrainResult

__all__ = [
    "TASKS",
    "Split",
    "Task",
    "TaskData",
    "TrainConfig",
    "TrainResult",
    "get_task",
    "known_tasks",
    "task_name",
]

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


def task_name(name: str) -> str:
    """The registered task ``name`` names: itself, or the task whose model it is (its model id,
    as logs and ``edgeci status`` show it: ``gesture-cnn1d`` is ``gestures``)."""
    from edge_sdk.tasks.registry import TASK_INFO

    tasks = _factories()
    if name in tasks:
        return name
    for info in TASK_INFO.values():
        if info.model_id == name and info.name in tasks:
            return info.name
    models = ", ".join(f"{info.model_id} ({info.name})" for info in TASK_INFO.values() if info.name in tasks)
    raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())} (or their models: {models})")


def get_task(name: str, **kwargs: Any) -> Task:
    """A new instance of the task registered as ``name`` (or whose model id it is, see
    :func:`task_name`); ``kwargs`` go to its constructor (``device=`` for the torch tasks)."""
    target = _factories()[task_name(name)]
    module_name, _, class_name = target.partition(":")
    task: Task = getattr(importlib.import_module(module_name), class_name)(**kwargs)
    return task
