"""Model registry. Importing this package registers every built-in model."""
from . import mlp, resnet_cifar, vgg, vit, wrn  # noqa: F401  (registration side effects)
from .registry import create_model, describe_models, list_models, model_task, register_model

__all__ = ["create_model", "list_models", "describe_models", "model_task", "register_model"]
