"""The server's read-only view of a store: a private snapshot of the catalog.

DuckDB admits one writing process and, while it writes, no reader in another process. A server
that held the catalog open would lock `discover watch` out; one that opened it per request would
be locked out while a watch writes. So the server reads a copy: taken while it holds the catalog
read-only (no writer can start meanwhile: writers wait, see `Store._connect`), refreshed at most
every `refresh_s` seconds when the catalog's files have changed, kept while a writer holds the
catalog. Per-checkpoint files (FAISS index, arrays, examples) are written before their rows commit
and never changed afterwards, so they are read from the store itself.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from discover.errors import NotScanned, StoreError
from discover.store import CATALOG, Store, resolve_root


class Snapshot:
    def __init__(self, root, refresh_s: float = 2.0):
        self.root = resolve_root(root)
        self.path = self.root / CATALOG
        if not self.path.exists():
            raise NotScanned(f"store {self.root} has no catalog yet; run `discover scan MODEL` first "
                             "(or pass --store / set DISCOVER_STORE)")
        self.refresh_s = refresh_s
        self.dir = Path(tempfile.mkdtemp(prefix="discover-serve-"))
        self._lock = threading.Lock()
        self._cons: list = []  # newest last; older ones stay open a while for requests in flight
        self._sig = None
        self._checked = 0.0
        self._n = 0
        self.refreshed_at = 0.0
        self.refresh(force=True)

    def _signature(self):
        out = []
        for p in (self.path, self.path.with_name(self.path.name + ".wal")):
            try:
                st = p.stat()
                out.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def refresh(self, force: bool = False) -> bool:
        """Copy the catalog if it changed and no other process writes it now. True if copied."""
        import duckdb

        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked < self.refresh_s:
                return False
            self._checked = now
            if self._sig is not None and self._signature() == self._sig:
                return False
            if self._cons:  # a writer at work: keep serving the last copy
                try:
                    src = duckdb.connect(str(self.path), read_only=True)
                except duckdb.IOException:
                    return False
            else:  # the first copy: wait for a writer as any reader would
                src = Store(self.root, read_only=True).con
            try:  # holding the catalog read-only: no writer can change it while it is copied
                self._n += 1
                dst = self.dir / f"catalog-{self._n}.duckdb"
                sig = self._signature()
                shutil.copyfile(self.path, dst)
                wal = self.path.with_name(self.path.name + ".wal")
                if wal.exists():
                    shutil.copyfile(wal, dst.with_name(dst.name + ".wal"))
            finally:
                src.close()
            try:
                con = duckdb.connect(str(dst), read_only=True)
            except duckdb.Error as e:
                raise StoreError(f"cannot read the catalog of {self.root}: {e}") from None
            self._cons.append(con)
            self._sig = sig
            self.refreshed_at = time.time()
            while len(self._cons) > 3:  # requests take milliseconds: three generations are plenty
                old = self._cons.pop(0)
                old.close()
            return True

    @contextmanager
    def store(self):
        """A read-only `Store` handle on the newest snapshot, for one request."""
        self.refresh()
        with self._lock:
            cur = self._cons[-1].cursor()
        try:
            yield Store.reader(self.root, cur)
        finally:
            cur.close()

    def close(self) -> None:
        with self._lock:
            for c in self._cons:
                c.close()
            self._cons = []
        shutil.rmtree(self.dir, ignore_errors=True)
