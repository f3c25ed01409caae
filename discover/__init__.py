"""discover: automated neuron discovery for GPT-style language models.

Heavy modules (torch, duckdb, faiss) are imported lazily so that `import discover` is cheap.
"""

__version__ = "0.1.0"

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
