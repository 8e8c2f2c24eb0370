"""Model implementations, looked up by the checkpoint's architecture name."""
from .registry import MODEL_REGISTRY, build_model, supported_architectures

__all__ = ["MODEL_REGISTRY", "build_model", "supported_architectures"]
