from .architectures import ARCHITECTURES, Architecture, UnsupportedArchitecture, architecture_for
from .loading import (LoadedModel, ModelLoadError, ModelSource, choose_streaming, load_model, quantizable_linears,
                      resolve_source, weight_array)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "LoadedModel",
    "ModelLoadError",
    "ModelSource",
    "UnsupportedArchitecture",
    "architecture_for",
    "choose_streaming",
    "load_model",
    "quantizable_linears",
    "resolve_source",
    "weight_array",
]
