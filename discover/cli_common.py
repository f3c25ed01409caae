"""What every verb of the command line shares: argument helpers, settings errors as one line,
the store handle, tables and JSON on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from discover.errors import DiscoverError


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=json_default)
    sys.stdout.write("\n")


def json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="hub id or local model directory (default: the embedded default model)")


def add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        metavar="DIR",
        default=None,
        help="store directory (default: $DISCOVER_STORE, else ./indexes)",
    )


def verb(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def settings(verb: str, make: Callable, error=DiscoverError):
    """Build a verb's settings object; its ValueError becomes one user-facing error line."""
    try:
        return make()
    except ValueError as e:
        raise error(f"{e} (see discover {verb} --help)") from None


def open_store(args, read_only: bool):
    from discover.store import Store

    return Store(args.store, read_only=read_only)


def fmt(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):  # token strings hold newlines and tabs: keep one row per line
        return x.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def toks(tokens: list[str], n: int = 6) -> str:
    return " ".join(repr(t) for t in tokens[:n])


def default_model() -> str:
    from discover.scan import default_model_spec

    return default_model_spec()
