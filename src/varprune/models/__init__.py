"""Model registry. Importing this package registers every built-in model."""

from . import mlp, resnet_cifar, unet, vgg, vit, wrn  # noqa: F401  (registration side effects)
from .registry import ModelError, create_model, describe_models, list_models, model_options, model_task, register_model

__all__ = [
    "ModelError",
    "create_model",
    "describe_models",
    "list_models",
    "model_options",
    "model_task",
    "register_model",
]
