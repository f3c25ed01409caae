"""`discover serve`: the local neuron search site and JSON API."""

from __future__ import annotations

from discover.cli.common import add_store, verb


def add_serve(sub) -> None:
    p = verb(sub, "serve", "A local web site and JSON API over the store: search, neuron pages, listings, probe.",
             "discover serve --store indexes --port 8000")
    add_store(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1: this machine only; another address prints a warning)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--device", default=None,
                   help="where the probe's model runs: cpu, cuda, cuda:1... (default: cuda if available, else cpu)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from discover.errors import ServeError
    from discover.serve import serve

    if not 0 < args.port < 65536:
        raise ServeError(f"--port {args.port} is not a port number (1-65535)")
    serve(args.store, host=args.host, port=args.port, device=args.device)
    return 0
