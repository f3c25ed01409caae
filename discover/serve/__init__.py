"""`discover serve`: a local neuron search site and JSON API over a store (read-only)."""

from discover.serve.app import create_app, serve  # noqa: F401
