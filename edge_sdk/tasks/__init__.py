"""Learning tasks by name. Modules are imported only when their task is asked for, so a
device that runs digits never imports the detection stack.

Adding a task is one line in :data:`TASKS`: ``"name": "module.path:ClassName"``.
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

TASKS: dict[str, str] = {
    "digits": "edge_sdk.tasks.digits:DigitsTask",
    "procdigits": "edge_sdk.tasks.procdigits:ProcDigitsTask",
    "gestures": "edge_sdk.tasks.gestures:GestureTask",
    "detection": "edge_sdk.tasks.detection:DetectionTask",
}


def known_tasks() -> tuple[str, ...]:
    """Registered task names, sorted."""
    return tuple(sorted(TASKS))


def task_name(name: str) -> str:
    """The registered task ``name`` names: itself, or the task whose model it is (its model id,
    as logs and ``edgeci status`` show it: ``gesture-cnn1d`` is ``gestures``)."""
    if name in TASKS:
        return name
    from edge_sdk.tasks.registry import TASK_INFO  # (torch-free; lazy: it imports this package)

    for info in TASK_INFO.values():
        if info.model_id == name and info.name in TASKS:
            return info.name
    models = ", ".join(f"{info.model_id} ({info.name})" for info in TASK_INFO.values() if info.name in TASKS)
    raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())} (or their models: {models})")


def get_task(name: str, **kwargs: Any) -> Task:
    """A new instance of the task registered as ``name`` (or whose model id it is, see
    :func:`task_name`); ``kwargs`` go to its constructor (``device=`` for the torch tasks)."""
    target = TASKS[task_name(name)]
    module_name, _, class_name = target.partition(":")
    task: Task = getattr(importlib.import_module(module_name), class_name)(**kwargs)
    return task
