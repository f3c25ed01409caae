"""The registry of architecture families: every module of this package that defines a `Family`
subclass adds its `model_types`, so adding a family is adding one file. Architectures that load
in transformers but that we cannot yet analyse correctly are refused by name, with the reason."""

from __future__ import annotations

import importlib
import pkgutil

from discover.adapter.families.base import Family, NormParams
from discover.errors import UnsupportedModel

#: model_type -> why we refuse it (they load, but a number we printed would be wrong)
REFUSED = {
    "phimoe": "its mixture-of-experts layout (sparsemixer routing) is not supported yet",
}


def _families() -> list[type[Family]]:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, Family) and obj is not Family and obj.model_types \
                    and obj.__module__ == mod.__name__:
                found.append(obj)
    return found


FAMILIES = _families()
#: config.model_type -> its Family class
BY_MODEL_TYPE = {mt: cls for cls in FAMILIES for mt in cls.model_types}
SUPPORTED = {mt: cls.name for mt, cls in BY_MODEL_TYPE.items()}
SUPPORTED_TEXT = ", ".join(dict.fromkeys(cls.label for cls in FAMILIES))


def family_for(config, where: str = "") -> Family:
    """The Family of a config (a dict or a transformers config), or UnsupportedModel."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    mt = cfg.get("model_type")
    at = f" in {where}" if where else ""
    if mt in REFUSED:
        raise UnsupportedModel(f"architecture '{mt}'{at} is refused: {REFUSED[mt]}; supported: {SUPPORTED_TEXT}")
    if mt not in BY_MODEL_TYPE:
        raise UnsupportedModel(f"unsupported architecture '{mt}'{at}; supported: {SUPPORTED_TEXT}")
    fam = BY_MODEL_TYPE[mt](mt)
    fam.check_config(cfg, where)
    return fam


__all__ = ["FAMILIES", "SUPPORTED", "SUPPORTED_TEXT", "REFUSED", "Family", "NormParams", "family_for"]
