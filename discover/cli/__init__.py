"""The `discover` command line: parse arguments, open the store, call one library function,
format the result. Every user error becomes one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from discover.cli.causal import add_patch, add_study
from discover.cli.query import add_query, add_sql
from discover.cli.runs import add_train, add_universality, add_watch
from discover.cli.serve import add_serve
from discover.cli.stages import (
    add_activations,
    add_report,
    add_run,
    add_scan,
    add_verify,
)
from discover.errors import DiscoverError, first_line


# ------------------------------------------------------------------------ main ----
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="discover",
        description="Automated neuron discovery for GPT-style language models.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    add_run(sub)
    add_scan(sub)
    add_query(sub)
    add_activations(sub)
    add_patch(sub)
    add_study(sub)
    add_verify(sub)
    add_report(sub)
    add_sql(sub)
    add_train(sub)
    add_watch(sub)
    add_universality(sub)
    add_serve(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        return int(func(args) or 0)
    except DiscoverError as e:
        print(f"discover: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("discover: interrupted; the store is unchanged by the unfinished work", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `discover ... | head`: stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except OSError as e:  # disk full, permissions... raised below the library's own checks
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"discover: error: {e.strerror or e}{where}; nothing unfinished was committed", file=sys.stderr)
        return 1
    except Exception as e:
        import duckdb

        if isinstance(e, duckdb.Error) or type(e).__module__.startswith("faiss"):
            print(f"discover: error: {first_line(e)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
