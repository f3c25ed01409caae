"""What commands use when no model is given: the embedded default model shipped in the package.
Torch-free (the query verbs import it)."""

from __future__ import annotations

from discover.errors import ModelLoadError


def default_model_dir():
    """The embedded default model shipped inside the package (None if not installed)."""
    from pathlib import Path

    d = Path(__file__).parent / "default_model"
    return d if (d / "config.json").is_file() else None


def default_model_spec() -> str:
    """The embedded default model's path, or ModelLoadError if the package lacks it."""
    d = default_model_dir()
    if d is None:
        raise ModelLoadError("no model given and the embedded default model is not installed; pass MODEL / --model")
    return str(d)
