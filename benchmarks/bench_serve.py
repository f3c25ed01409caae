"""`discover serve` under load: latency of the token API on a GPT-2-XL-shaped catalog.

A GPT-2 XL-shaped model (48 layers x 6,400 neurons = 307,200 neurons, d_model 1,600; random
weights, Hugging Face's init; `--vocab 4096` of GPT-2's BPE by default to keep the scan short: the
API reads one column of per-token arrays whatever the vocabulary) is scanned into a temporary
store. `discover serve` runs over it in its own process. Then, side by side in one run:

- `direct`: `query_token` twice (most congruent and most negative, what one API answer holds) in
  this process on a store opened once: the library's floor;
- `single`: one client, requests one after another: `GET /api/token?token_id=T&top=20&model=M`;
- `50 clients`: 50 threads, each `--requests` requests, all at once (the load test).

Reported: p50 / p99 in ms of each (goal: p50 <= 20 ms for the single client, issue 16), requests
per second under load, and errors (must be 0).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_query import build_model  # noqa: E402

SPEC = "bench/gpt2-xl-shaped"
TARGET_MS = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"status {r.status}")
    return time.perf_counter() - t


def pct(xs, q):
    return 1000 * C.percentile(xs, q)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=20, help="requests per client under load (20)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--single", type=int, default=200, help="sequential requests of the single client (200)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import numpy as np

    from discover.adapter import from_model
    from discover.query import query_token
    from discover.scan import ScanConfig, scan
    from discover.store import Store

    res = {"machine": C.machine(), "code": C.code_version(), "layers": args.layers, "vocab": args.vocab}
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        tmp = Path(tmp)
        C.log(f"building and scanning a GPT-2 XL-shaped model ({args.layers} x 6400 neurons, vocab {args.vocab})",
              quiet=args.json)
        model = build_model(args.layers, args.vocab)
        tok = C.save_tokenizer(C.gpt2_tokenizer(args.vocab), tmp / "tokenizer", args.vocab)
        view = from_model(model, tok, spec=SPEC)
        result = scan(view, ScanConfig(), progress=False)
        with Store(tmp / "store") as store:
            store.write_scan(view, result, ScanConfig(), spec=SPEC)
            cid = view.checkpoint_id[:12]
        del result, view, model
        rng = np.random.default_rng(0)
        ids = rng.integers(0, args.vocab, size=max(args.single, args.clients * args.requests)).tolist()

        direct = []
        with Store(tmp / "store", read_only=True) as store:
            query_token(store, SPEC, token_id=0, top=20)
            for t in ids[: args.single]:
                t0 = time.perf_counter()
                query_token(store, SPEC, token_id=t, top=20)
                query_token(store, SPEC, token_id=t, top=20, negative=True)
                direct.append(time.perf_counter() - t0)

        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "discover", "serve", "--store", str(tmp / "store"), "--port",
                                 str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            if "http://" not in line:
                raise SystemExit(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
            base = f"http://127.0.0.1:{port}/api/token?top=20&model={cid}&token_id="
            for t in ids[:10]:  # warm: arrays mapped, snapshot opened
                fetch(base + str(t))
            single = [fetch(base + str(t)) for t in ids[: args.single]]
            lat, errors = [], []

            def client(i):
                for j in range(args.requests):
                    try:
                        lat.append(fetch(base + str(ids[i * args.requests + j])))
                    except Exception as e:  # noqa: BLE001 (counted)
                        errors.append(repr(e))

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(10)
    res.update({
        "direct_ms": {"p50": pct(direct, 50), "p99": pct(direct, 99)},
        "single_ms": {"p50": pct(single, 50), "p99": pct(single, 99)},
        "load": {"clients": args.clients, "requests": len(lat), "errors": len(errors), "wall_s": wall,
                 "per_second": len(lat) / wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)},
    })
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(C.table([["direct (library, 2 queries)", f"{res['direct_ms']['p50']:.1f}", f"{res['direct_ms']['p99']:.1f}", "-"],
                       ["single client (HTTP)", f"{res['single_ms']['p50']:.1f}", f"{res['single_ms']['p99']:.1f}", "-"],
                       [f"{args.clients} clients at once", f"{res['load']['p50_ms']:.1f}", f"{res['load']['p99_ms']:.1f}",
                        f"{res['load']['per_second']:.0f}/s, {res['load']['errors']} errors"]],
                      ["token API", "p50 ms", "p99 ms", "throughput"]))
        print(f"goal: single-client p50 <= {TARGET_MS} ms; 0 errors under load")
    return 0 if res["single_ms"]["p50"] <= TARGET_MS and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
