"""The server's read-only view of a store: a private snapshot of the catalog.

DuckDB admits one writing process and, while it writes, no reader in another process. A server
that held the catalog open would lock `discover watch` out; one that opened it per request would
be locked out while a watch writes. So the server reads a copy: taken while it holds the catalog
read-only (no writer can start meanwhile: writers wait, see `Store._connect`), refreshed at most
every `refresh_s` seconds when the catalog's files have changed, kept while a writer holds the
catalog. A copy is closed and deleted once a newer one exists and no request still reads it.
Per-checkpoint files (FAISS index, arrays, examples) are read from the store itself: they are
written before their rows commit; a rescan or a rerun corpus pass deletes the files it replaces,
so a page served from an old copy while such a writer runs can miss them (a one-line error; the
next refresh after the writer finishes sees the new rows).
"""

from __future__ import annotations

import os
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
        _remove_orphans()
        self.dir = Path(tempfile.mkdtemp(prefix=f"discover-serve-{os.getpid()}-"))
        self._lock = threading.Lock()
        self._cons: list = []  # [connection, path, requests reading it], newest last
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
            self._cons.append([con, dst, 0])
            self._sig = sig
            self.refreshed_at = time.time()
            self._drop_unused()
            return True

    def _drop_unused(self) -> None:
        """Close and delete every copy but the newest that no request reads (under the lock)."""
        keep = []
        for entry in self._cons[:-1]:
            if entry[2] == 0:
                entry[0].close()
                for p in (entry[1], entry[1].with_name(entry[1].name + ".wal")):
                    p.unlink(missing_ok=True)
            else:
                keep.append(entry)
        self._cons = keep + self._cons[-1:]

    @contextmanager
    def store(self):
        """A read-only `Store` handle on the newest snapshot, for one request."""
        self.refresh()
        with self._lock:
            entry = self._cons[-1]
            entry[2] += 1
            cur = entry[0].cursor()
        try:
            yield Store.reader(self.root, cur)
        finally:
            cur.close()
            with self._lock:
                entry[2] -= 1
                self._drop_unused()

    def close(self) -> None:
        with self._lock:
            for entry in self._cons:
                entry[0].close()
            self._cons = []
        shutil.rmtree(self.dir, ignore_errors=True)


def _remove_orphans() -> None:
    """Delete the snapshot folders of servers that are gone (killed before they could clean up)."""
    for d in Path(tempfile.gettempdir()).glob("discover-serve-*-*"):
        pid = d.name.split("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass
