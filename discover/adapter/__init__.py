"""One model adapter: every supported architecture, and GGUF files, seen the same way.

- `locate`: where a model is (directory, hub id, `.gguf`) and its checkpoint id;
- `gguf`: GGUF files checked, identified and loaded dequantized;
- `families/`: one small module per architecture family, the only place models differ;
- `view`: `ModelView`, what everything downstream sees.
"""

from discover.adapter.families import FAMILIES, REFUSED, SUPPORTED, SUPPORTED_TEXT, NormParams, family_for
from discover.adapter.locate import (check_architecture, check_safetensors, content_hash, identify, normalise_spec,
                                     require_statistics, resolve_model_dir, tensor_hash, weight_files)
from discover.adapter.view import ModelView, Trace, from_model, load_model

__all__ = [
    "FAMILIES", "REFUSED", "SUPPORTED", "SUPPORTED_TEXT", "NormParams", "family_for", "check_architecture",
    "check_safetensors", "content_hash", "identify", "normalise_spec", "require_statistics", "resolve_model_dir",
    "tensor_hash",
    "weight_files", "ModelView", "Trace", "from_model", "load_model",
]
