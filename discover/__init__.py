"""discover: automated neuron discovery for GPT-style language models.

Heavy modules (torch, duckdb, faiss) are imported lazily so that `import discover` is cheap.
"""

__version__ = "0.1.0"

import os as _os

# MKL's results must not depend on its thread count: a corpus pass split across cluster workers
# (one core each) must equal the same pass in one process (every core). Strict conditional
# numerical reproducibility does that on one machine type at no measured cost; it has to be set
# before MKL starts, so it is set here, before discover imports torch. A value the user set wins.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from discover.errors import (  # noqa: F401
    CorpusError,
    DiscoverError,
    ModelLoadError,
    NotScanned,
    QueryError,
    StoreError,
    TrainError,
    UnsupportedModel,
)

# The library's main entry points, imported on first use (`from discover import scan_model`).
_LAZY = {
    "Store": "discover.store",
    "load_model": "discover.adapter",
    "from_model": "discover.adapter",
    "ModelView": "discover.adapter",
    "ScanConfig": "discover.scan",
    "RoleThresholds": "discover.scan",
    "scan_model": "discover.scan",
    "query_token": "discover.query",
    "query_neuron": "discover.query",
    "query_roles": "discover.query",
    "run_sql": "discover.query",
    "open_corpus": "discover.corpus",
    "TrainConfig": "discover.train",
    "WatchConfig": "discover.watch",
    "watch_once": "discover.watch",
    "latest_universality": "discover.universality",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'discover' has no attribute {name!r}")
