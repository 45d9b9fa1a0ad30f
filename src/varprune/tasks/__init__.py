"""Tasks: loss, metrics and their direction, joint augmentation, evaluation (base.py says the interface).

Adding a task is one class in this package and its name in ``TASKS``; a dataset names its task.
"""

from varprune.tasks.augment import crop_flip
from varprune.tasks.base import Task
from varprune.tasks.classification import Classification
from varprune.tasks.instructions import InstructionTuning
from varprune.tasks.segmentation import Segmentation
from varprune.tasks.text import LanguageModeling, TextClassification, logits_of

TASKS: dict[str, type[Task]] = {
    "classification": Classification,
    "segmentation": Segmentation,
    "language-modeling": LanguageModeling,
    "text-classification": TextClassification,
    "instruction-tuning": InstructionTuning,
}


def task_for(info) -> Task:
    """The task of a dataset (its ``DatasetInfo``)."""
    return TASKS[info.task](info.num_classes, info.crop_pad, info.flip)


__all__ = [
    "TASKS",
    "Classification",
    "InstructionTuning",
    "LanguageModeling",
    "Segmentation",
    "Task",
    "TextClassification",
    "crop_flip",
    "logits_of",
    "task_for",
]
