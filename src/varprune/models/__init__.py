"""Model registry. Importing this package registers every built-in model (the text models of
models/hf.py too: transformers is imported only when one is built)."""

from . import hf, mlp, resnet_cifar, unet, vgg, vit, wrn  # noqa: F401  (registration side effects)
from .registry import (
    TASKS,
    TEXT_SIZES,
    TEXT_TASKS,
    ModelError,
    create_model,
    describe_models,
    list_models,
    model_options,
    model_task,
    model_tasks,
    register_model,
)

__all__ = [
    "TASKS",
    "TEXT_SIZES",
    "TEXT_TASKS",
    "ModelError",
    "create_model",
    "describe_models",
    "list_models",
    "model_options",
    "model_task",
    "model_tasks",
    "register_model",
]
