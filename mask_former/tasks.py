"""The segmentation tasks a model's inference can produce, in one table.

Every layer that deals with a task reads :data:`TASKS` instead of keeping its own list: the
meta-architectures (which switch turns an output on, under which key it is returned), the
evaluators (``mask_former.evaluation``, by ``evaluator``), the demo (how to draw it, which
metadata it needs) and ``tools/run_demo.py``. A new task is a row here plus its inference code,
its evaluator (registered in ``mask_former.evaluation``) and, for the demo, its drawing.

This module imports nothing from the rest of the package.
"""
from dataclasses import dataclass
from typing import Dict, List, Tuple

__all__ = ["Task", "TASKS", "TASK_NAMES", "get_task", "enabled_tasks", "set_task_enabled"]


@dataclass(frozen=True)
class Task:
    """One task.

    Attributes:
        name: what users call it ("semantic", "instance", "panoptic").
        config_key: the switch under ``MODEL.MASK_FORMER.TEST`` that turns it on in inference.
        output_key: the key of its result in each per-image dict a model returns.
        evaluator: name of its evaluator builder in ``mask_former.evaluation.TASK_EVALUATORS``.
        draw_method: the ``detectron2.utils.visualizer.Visualizer`` method that draws its result.
        video_draw_method: the ``VideoVisualizer`` method that draws it on video frames.
        required_metadata: metadata fields the demo needs to name its classes; a tuple inside
            means "any of these".
    """

    name: str
    config_key: str
    output_key: str
    evaluator: str
    draw_method: str
    video_draw_method: str
    required_metadata: Tuple[object, ...]


# In the order a default is picked: the richest output first.
TASKS: Tuple[Task, ...] = (
    Task("panoptic", "PANOPTIC_ON", "panoptic_seg", "panoptic", "draw_panoptic_seg",
         "draw_panoptic_seg_predictions", ("stuff_classes", "thing_classes")),
    Task("instance", "INSTANCE_ON", "instances", "instance", "draw_instance_predictions",
         "draw_instance_predictions", (("thing_classes", "stuff_classes"),)),
    Task("semantic", "SEMANTIC_ON", "sem_seg", "semantic", "draw_sem_seg", "draw_sem_seg",
         ("stuff_classes",)),
)
TASK_NAMES: Tuple[str, ...] = tuple(task.name for task in TASKS)
_BY_NAME: Dict[str, Task] = {task.name: task for task in TASKS}


def get_task(name: str) -> Task:
    """The task called ``name``; a ValueError listing the tasks otherwise."""
    if name not in _BY_NAME:
        raise ValueError(f"Unknown task {name!r}; expected one of {list(TASK_NAMES)}")
    return _BY_NAME[name]


def enabled_tasks(cfg) -> List[Task]:
    """The tasks whose ``MODEL.MASK_FORMER.TEST.<config_key>`` is True, in :data:`TASKS` order."""
    return [task for task in TASKS if getattr(cfg.MODEL.MASK_FORMER.TEST, task.config_key)]


def set_task_enabled(cfg, name: str, enabled: bool = True) -> Task:
    """Switch task ``name`` on (or off) in an unfrozen config; returns the task."""
    task = get_task(name)
    setattr(cfg.MODEL.MASK_FORMER.TEST, task.config_key, enabled)
    return task
