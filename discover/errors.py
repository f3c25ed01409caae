"""The named exceptions of the library. Each message says what went wrong and what to do next;
the CLI prints it as one line and exits non-zero."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


class DiscoverError(Exception):
    """Base class: a user-facing error (bad input, unsupported model, busy store...)."""

    exit_code = 2


def failure_reason(e: BaseException) -> str:
    """The one line recorded for a failed piece of work: a DiscoverError's own message, any other
    exception's first line after its type name."""
    return first_line(e) if isinstance(e, DiscoverError) else f"{type(e).__name__}: {first_line(e)}"


class ModelLoadError(DiscoverError):
    """The model path / hub id could not be loaded (missing, not a model, corrupt weights)."""


class UnsupportedModel(DiscoverError):
    """The model loads but its architecture is not one the adapter knows."""


class StoreError(DiscoverError):
    """The store directory or catalog cannot be used (is a file, locked, corrupt...)."""


class StoreBusy(StoreError):
    """Another process holds the catalog (and kept it longer than we waited)."""


class QueryError(DiscoverError):
    """A query names something that does not exist (neuron out of range, unknown token...)."""


class NotScanned(QueryError):
    """The model asked about has not been scanned into this store."""


class NotFound(QueryError):
    """A thing asked for by name (a token study...) is not in this store."""


class CorpusError(DiscoverError):
    """A corpus spec cannot be read (missing path, empty corpus, missing field...)."""


class TrainError(DiscoverError):
    """A training run cannot start or resume (bad config, incompatible output dir...)."""


class ServeError(DiscoverError):
    """`discover serve` cannot start (address in use, bad host...)."""


class ClusterError(DiscoverError):
    """A Ray cluster cannot be used: a malformed or unreachable address, no resource that fits a
    worker, Ray not installed, or a worker that kept failing."""
