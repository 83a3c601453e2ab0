"""Model architectures described by JSON-serialisable specs (pure torch, no ray)."""

from slimray.families.classifier.spec import CNNSpec, InputSpec, MLPSpec, ModelSpec, ModuleSpec, build_model, parse_spec, spec_from_model
from slimray.families.classifier.teachers import load_ccexam_mnist_teacher

__all__ = [
    "CNNSpec",
    "InputSpec",
    "MLPSpec",
    "ModelSpec",
    "ModuleSpec",
    "parse_spec",
    "build_model",
    "spec_from_model",
    "load_ccexam_mnist_teacher",
]
