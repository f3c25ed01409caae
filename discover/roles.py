"""Role hypotheses from a neuron's weight statistics (the scan's first pass), torch-free so that
queries can re-derive roles without loading the model stack."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ROLES = ("prediction", "suppression", "partition", "entropy", "memory_management", "signal_boosting")


@dataclass(frozen=True)
class RoleThresholds:
    """First-pass role hypotheses (defaults from "Universal Neurons in GPT2").

    kurtosis: prediction / suppression need vocabulary kurtosis (non-excess) above this.
    partition_var: partition needs vocabulary variance above `partition_var / d_model`
        (the paper's 0.005 at d_model 1024 is 5.12 / d_model; random directions give ~1 / d_model).
    entropy_norm_z: entropy candidates have ||w_out|| this many standard deviations above the
        model's mean ||w_out|| ...
    entropy_var: ... and vocabulary variance below `entropy_var / d_model` (a flat c_t).
    io_cos: cos(w_in, w_out) below -io_cos is memory management, above +io_cos signal boosting.
    """

    kurtosis: float = 10.0
    partition_var: float = 5.12
    entropy_norm_z: float = 3.0
    entropy_var: float = 0.5
    io_cos: float = 0.5

    def __post_init__(self):
        for name in ("kurtosis", "partition_var", "entropy_norm_z", "entropy_var"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"role threshold {name} must be a positive number, got {getattr(self, name)}")
        if not 0 < self.io_cos < 1:
            raise ValueError(f"role threshold io_cos must be in (0, 1), got {self.io_cos}")


def assign_roles(stats: dict[str, np.ndarray], d_model: int, t: RoleThresholds) -> tuple[list, np.ndarray]:
    """Role hypotheses for neurons whose stats arrays are (neuron,) over the whole model.

    Returns ([(index, role, score), ...], primary) where `primary` is each neuron's first role
    in ROLES order, or None. Scores rank candidates within a role (higher = stronger).
    """
    kurt, skew, var = stats["vocab_kurt"], stats["vocab_skew"], stats["vocab_var"]
    norm, cio = stats["w_out_norm"], stats["cos_in_out"]
    sd = norm.std()
    norm_z = (norm - norm.mean()) / sd if sd > 0 else np.zeros_like(norm)
    masks = {
        "prediction": ((kurt > t.kurtosis) & (skew > 0), kurt),
        "suppression": ((kurt > t.kurtosis) & (skew < 0), kurt),
        "partition": (var > t.partition_var / d_model, var * d_model),
        "entropy": ((norm_z >= t.entropy_norm_z) & (var < t.entropy_var / d_model), norm_z),
        "memory_management": (cio < -t.io_cos, -cio),
        "signal_boosting": (cio > t.io_cos, cio),
    }
    rows = []
    primary = np.full(len(kurt), None, dtype=object)
    for role in ROLES:
        m, score = masks[role]
        idx = np.flatnonzero(m)
        rows.extend(zip(idx.tolist(), [role] * len(idx), score[idx].astype(float).tolist()))
        unset = idx[primary[idx] == None]  # noqa: E711 (object array)
        primary[unset] = role
    return rows, primary
