"""What every verb of the command line shares: argument helpers, settings errors as one line,
the store handle, tables and JSON on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from discover.errors import DiscoverError


def print_json(obj) -> None:
    """One JSON document on stdout (NaN and infinities as null: JSON has no NaN)."""
    json.dump(finite(obj), sys.stdout, indent=2, default=json_default)
    sys.stdout.write("\n")


def finite(x):
    """`x` with every non-finite float (and numpy float) replaced by None, recursively."""
    import math

    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if type(x).__module__ == "numpy" and getattr(x, "shape", None) == () and isinstance(x.item(), float):
        return finite(x.item())
    return x


def json_default(o):
    """numpy scalars and arrays as Python values; anything else as its str."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def add_model_arg(p: argparse.ArgumentParser) -> None:
    """The optional MODEL positional (default: the embedded model)."""
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="hub id or local model directory (default: the embedded default model)")


def add_store(p: argparse.ArgumentParser) -> None:
    """--store DIR."""
    p.add_argument(
        "--store",
        metavar="DIR",
        default=None,
        help="store directory (default: $DISCOVER_STORE, else ./indexes)",
    )


def verb(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A verb's parser: its help as the description, an example as the epilog."""
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
    """The store `--store` names (a handle: use it in a `with`)."""
    from discover.store import Store

    return Store(args.store, read_only=read_only)


def fmt(x, nd=3) -> str:
    """One table cell: numbers to `nd` significant digits, None as -, control characters escaped."""
    if x is None:
        return "-"
    if isinstance(x, str):  # token strings hold newlines and tabs: keep one row per line
        return x.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def toks(tokens: list[str], n: int = 6) -> str:
    """The first `n` tokens, quoted."""
    return " ".join(repr(t) for t in tokens[:n])


def default_model() -> str:
    """The embedded default model's path."""
    from discover.defaults import default_model_spec

    return default_model_spec()


def add_ray(p: argparse.ArgumentParser, what: str = "the corpus pass; verify's mean ablations") -> None:
    """--ray ADDRESS, --ray-cpus N, --ray-gpus G (the work `what` across a Ray cluster)."""
    g = p.add_argument_group("cluster (Ray)")
    g.add_argument("--ray", metavar="ADDRESS", default=None,
                   help=f"spread the work over a Ray cluster ({what}): local[:N] "
                        "(start one of N CPUs here), auto (the cluster this node joined with `ray start`) or "
                        "HOST:PORT; results equal one process's")
    g.add_argument("--ray-cpus", type=float, default=1.0, metavar="N", help="CPU cores per worker (1)")
    g.add_argument("--ray-gpus", type=float, default=0.0, metavar="G",
                   help="GPUs per worker (0: CPU workers); > 0 makes GPU workers")


def ray_cluster(args):
    """A context manager: the Ray cluster --ray names (checked and joined), or nothing."""
    import contextlib

    if getattr(args, "ray", None) is None:
        return contextlib.nullcontext(None)
    from discover.cluster import Cluster, parse_address

    return Cluster(parse_address(args.ray, cpus=args.ray_cpus, gpus=args.ray_gpus))


def cluster_stream(cluster):
    """The corpus pass's `stream` on a joined cluster (None: this process)."""
    if cluster is None:
        return None
    from discover.cluster import ClusterStream

    return ClusterStream(cluster)


def checkpoint_jobs(cluster):
    """Watch's checkpoints as parallel jobs on a joined cluster (None: this process, in turn)."""
    if cluster is None:
        return None
    from discover.watch_jobs import CheckpointJobs

    return CheckpointJobs(cluster)


def cluster_verify(cluster, allow_pickle: bool = False):
    """A context manager: verify's forward passes and mean ablations on a joined cluster's workers
    (stopped at its end), or None (this process)."""
    if cluster is None:
        from contextlib import nullcontext

        return nullcontext()
    from discover.cluster import ClusterVerify

    return ClusterVerify(cluster, allow_pickle=allow_pickle)
