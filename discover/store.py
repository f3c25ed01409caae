"""The store: a DuckDB catalog plus, per checkpoint, a directory with its FAISS index and tokenizer.

Layout of a store directory (default `./indexes`, else `--store DIR` or `$DISCOVER_STORE`)::

    catalog.duckdb                   the catalog (schema: SCHEMA below, documented in README)
    checkpoints/<id>-<scan>/w_out.faiss  IndexFlatIP over unit-norm processed w_out, id = layer*d_mlp+neuron
    checkpoints/<id>-<scan>/w_in.npy     unit-norm processed w_in (float16, row = layer*d_mlp+neuron): tracking
    checkpoints/<id>-<scan>/tokenizer/   the tokenizer, so queries need not load the model
    checkpoints/<id>-<scan>/arrays/      memory-mapped copies of what `query token` reads
                                         (the catalog stays the reference; these make it ms-fast)

A scan is one transaction: its files are written to a fresh directory first, then every row
is inserted and committed at once; only committed rows point at a directory. A killed scan
leaves no rows (DuckDB rolls back what was not committed) and at worst an unreferenced
directory, removed the next time the store is opened for writing.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from discover.errors import NotScanned, QueryError, StoreBusy, StoreError, first_line

DEFAULT_STORE = "indexes"
CATALOG = "catalog.duckdb"
LOCK_WAIT_S = 10.0  # how long opening waits while another process holds the catalog (DISCOVER_LOCK_WAIT)

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    checkpoint_id   VARCHAR PRIMARY KEY,  -- sha256 of the weight files and config
    architecture    VARCHAR,              -- config.model_type
    n_layers        INTEGER,
    d_model         INTEGER,
    d_mlp           INTEGER,
    d_vocab         INTEGER,
    act_fn          VARCHAR,
    norm            VARCHAR,              -- layernorm | rmsnorm
    gated           BOOLEAN,
    vocab_hash      VARCHAR,              -- sha256 of the token strings
    config          JSON,                 -- the model's config.json
    scan_settings   JSON,                 -- top_k, token_top_k
    role_thresholds JSON,
    files_dir       VARCHAR,              -- checkpoints/<dir> inside the store
    scanned_at      TIMESTAMP,
    scan_seconds    DOUBLE,
    discover_version VARCHAR,
    source_format   VARCHAR,              -- transformers | gguf
    quantization    VARCHAR,              -- GGUF file type (e.g. Q4_1); NULL for transformers weights
    neuron_layout   JSON                  -- mixtures of experts: {experts, expert_size, shared}; NULL: dense
);
-- catalogs written before GGUF and mixture-of-experts support
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS source_format VARCHAR;
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS quantization VARCHAR;
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS neuron_layout JSON;
CREATE TABLE IF NOT EXISTS models (
    spec            VARCHAR,              -- hub id, or absolute path of a local model directory
    checkpoint_id   VARCHAR,
    seen_at         TIMESTAMP,
    PRIMARY KEY (spec, checkpoint_id)
);
CREATE TABLE IF NOT EXISTS neurons (
    checkpoint_id   VARCHAR,
    layer           SMALLINT,
    neuron          INTEGER,
    vocab_mean      DOUBLE,               -- moments of c_t = cos(w_out, U[:, t]) over tokens t
    vocab_var       DOUBLE,               -- population variance
    vocab_skew      DOUBLE,               -- E[z^3]
    vocab_kurt      DOUBLE,               -- E[z^4], NOT excess (a Gaussian gives 3)
    w_in_norm       DOUBLE,               -- ||w_in|| (pre-MLP norm gain folded in)
    w_out_norm      DOUBLE,               -- ||w_out|| (processed)
    cos_in_out      DOUBLE,               -- cos(w_in, w_out)
    w_up_norm       DOUBLE,               -- gated MLPs only
    cos_up_out      DOUBLE,               -- gated MLPs only
    role            VARCHAR               -- primary role hypothesis, NULL if none
);
CREATE TABLE IF NOT EXISTS neuron_tokens (
    checkpoint_id   VARCHAR,
    layer           SMALLINT,
    neuron          INTEGER,
    side            VARCHAR,              -- 'top' (most promoted) | 'bottom' (most suppressed)
    rank            SMALLINT,             -- 0 = strongest
    token_id        INTEGER,
    token           VARCHAR,
    congruence      REAL,                 -- w_out . U[:, t]
    cosine          REAL                  -- cos(w_out, U[:, t])
);
CREATE TABLE IF NOT EXISTS roles (
    checkpoint_id   VARCHAR,
    layer           SMALLINT,
    neuron          INTEGER,
    role            VARCHAR,
    score           DOUBLE                -- ranks candidates within a role (higher = stronger)
);
CREATE TABLE IF NOT EXISTS token_neurons (
    checkpoint_id   VARCHAR,
    token_id        INTEGER,
    sign            TINYINT,              -- +1: most congruent, -1: most negative
    rank            SMALLINT,
    layer           SMALLINT,
    neuron          INTEGER,
    congruence      REAL
);
CREATE TABLE IF NOT EXISTS tokens (
    checkpoint_id   VARCHAR,
    token_id        INTEGER,
    token           VARCHAR,
    unembed_norm    REAL                  -- ||U[:, t]|| of the processed unembedding
);
CREATE TABLE IF NOT EXISTS activation_passes (
    pass_id         VARCHAR PRIMARY KEY,
    checkpoint_id   VARCHAR,
    pass_key        VARCHAR,              -- hash of what identifies the pass (corpus, split, settings)
    corpus_fingerprint VARCHAR,           -- sha256 over the corpus's document ids and texts
    corpus          JSON,                 -- kind, path, documents, characters, ...
    split           VARCHAR,              -- all | train | heldout
    settings        JSON,                 -- context, batch_size, top_k, window, bins, bos, pairs
    tokens          BIGINT,               -- document tokens behind the committed results
    sequences       BIGINT,
    documents       BIGINT,               -- documents reached (the last may be partly read)
    exhausted       BOOLEAN,              -- the corpus ended before the token budget
    files_dir       VARCHAR,              -- activations/<dir> inside the store
    results_dir     VARCHAR,              -- subdirectory with the committed arrays
    started_at      TIMESTAMP,
    updated_at      TIMESTAMP,
    seconds         DOUBLE,
    discover_version VARCHAR
);
CREATE TABLE IF NOT EXISTS neuron_activations (
    pass_id         VARCHAR,
    checkpoint_id   VARCHAR,
    layer           SMALLINT,
    neuron          INTEGER,
    act_mean        DOUBLE,               -- exact moments over every counted position (float64)
    act_var         DOUBLE,               -- population variance
    act_skew        DOUBLE,               -- E[z^3]
    act_kurt        DOUBLE,               -- E[z^4], NOT excess (a Gaussian gives 3)
    act_freq        DOUBLE,               -- fraction of positions with activation > 0
    act_min         DOUBLE,
    act_max         DOUBLE,
    act_tokens      BIGINT,               -- positions counted: every token; for an expert, the tokens routed to it
    act_tail        DOUBLE                -- +1 / -1: the side of its strong activations (its 0.1% / 99.9% quantiles)
);
ALTER TABLE neuron_activations ADD COLUMN IF NOT EXISTS act_tokens BIGINT;
ALTER TABLE neuron_activations ADD COLUMN IF NOT EXISTS act_tail DOUBLE;
CREATE TABLE IF NOT EXISTS activation_examples (
    pass_id         VARCHAR,
    checkpoint_id   VARCHAR,
    layer           SMALLINT,
    neuron          INTEGER,
    kind            VARCHAR,              -- 'activation' (max activation) | 'dla' (max logit attribution)
    rank            SMALLINT,             -- 0 = strongest; one entry per document
    value           REAL,                 -- the activation, or act * w_out . U[:, next] / final-norm scale
    doc_id          VARCHAR,
    doc_ordinal     BIGINT,               -- the document's index in the pass's split
    chunk           INTEGER,              -- which context-length piece of the document
    position        INTEGER,              -- of the maximum in that piece (0 = the BOS)
    doc_token       BIGINT,               -- of the maximum in the document's tokens
    token_id        INTEGER,              -- the token at the maximum
    token           VARCHAR,
    next_token_id   INTEGER,              -- the token after it (-1: outside the window)
    context         VARCHAR               -- the window's text (before + max + after tokens)
);
CREATE TABLE IF NOT EXISTS activation_histograms (
    pass_id         VARCHAR,
    checkpoint_id   VARCHAR,
    layer           SMALLINT,
    neuron          INTEGER,
    bin             SMALLINT,             -- fixed geometric bins, 4 per octave (only non-empty bins)
    lo              DOUBLE,               -- [lo, hi) for positive bins, (lo, hi] for negative ones
    hi              DOUBLE,
    count           BIGINT
);
CREATE TABLE IF NOT EXISTS verify_runs (
    verify_id       VARCHAR PRIMARY KEY,
    checkpoint_id   VARCHAR,
    corpus_fingerprint VARCHAR,
    corpus          JSON,
    split           VARCHAR,              -- the held-out text the tests ran on
    tokens          BIGINT,
    settings        JSON,                 -- VerifyConfig: thresholds of every decision rule
    checks          JSON,                 -- skipped rules; the shuffled-label check
    created_at      TIMESTAMP,
    seconds         DOUBLE,
    discover_version VARCHAR
);
CREATE TABLE IF NOT EXISTS hypotheses (
    verify_id       VARCHAR,
    checkpoint_id   VARCHAR,
    layer           SMALLINT,
    neuron          INTEGER,
    kind            VARCHAR,              -- feature | prediction | suppression
    subject         VARCHAR,              -- the rule name, or the token
    subject_id      INTEGER,              -- the token id (prediction / suppression)
    verdict         VARCHAR,              -- confirmed | rejected | inconclusive
    decided_by      VARCHAR,              -- the decision rule that decided
    evidence        JSON                  -- every number the decision used
);
CREATE TABLE IF NOT EXISTS patch_experiments (
    experiment_id   VARCHAR PRIMARY KEY,
    checkpoint_id   VARCHAR,
    clean           VARCHAR,              -- the prompts, as given
    corrupted       VARCHAR,
    target          VARCHAR,
    contrast        VARCHAR,
    direction       VARCHAR,              -- denoising: clean activations patched into the corrupted run
    positions       VARCHAR,              -- last | all
    m_clean         DOUBLE,               -- logit(target) - logit(contrast) at the final position
    m_corrupted     DOUBLE,
    layers          JSON,                 -- the layers patched exactly
    created_at      TIMESTAMP,
    seconds         DOUBLE
);
CREATE TABLE IF NOT EXISTS patch_results (
    experiment_id   VARCHAR,
    checkpoint_id   VARCHAR,
    layer           SMALLINT,
    neuron          INTEGER,
    recovery        DOUBLE,               -- exact; NULL where the layer was not patched exactly
    attribution     DOUBLE                -- the first-order screen, every layer
);
CREATE TABLE IF NOT EXISTS study_runs (
    study_id        VARCHAR PRIMARY KEY,
    checkpoint_id   VARCHAR,
    target          VARCHAR,              -- the token studied
    target_id       INTEGER,
    contrast        VARCHAR,              -- what the corrupted prompts predict instead
    contrast_id     INTEGER,
    corpus          JSON,                 -- the corpus mined (NULL: prompts given by hand)
    settings        JSON,
    counts          JSON,                 -- positions, predicted, occurs, predicted_and_next, prompts, tried, found
    pairs           JSON,                 -- [{clean, corrupted (token ids), position, m_clean, m_corrupted, source}]
    logit_lens      JSON,                 -- {clean, corrupted}: mean logit difference after each block
    layer_patching  JSON,                 -- {attn, mlp}: mean recovery per layer
    neurons         JSON,                 -- the top neurons with congruence and token rank
    seconds         JSON,                 -- per part
    created_at      TIMESTAMP,
    discover_version VARCHAR,
    pass_id         VARCHAR               -- the examination's corpus pass (curves, examples); NULL: none
);
ALTER TABLE study_runs ADD COLUMN IF NOT EXISTS pass_id VARCHAR;
CREATE TABLE IF NOT EXISTS study_neurons (
    study_id        VARCHAR,
    checkpoint_id   VARCHAR,
    layer           SMALLINT,
    neuron          INTEGER,
    recovery        DOUBLE,               -- mean exact recovery over the study's pairs
    recovery_sd     DOUBLE                -- its standard deviation (NULL with one pair)
);
CREATE TABLE IF NOT EXISTS watch_runs (
    run_id          VARCHAR PRIMARY KEY,
    watch_dir       VARCHAR,              -- the directory watched (absolute)
    started_at      TIMESTAMP,
    ended_at        TIMESTAMP,            -- NULL while running (or if the process was killed)
    status          VARCHAR,              -- running | ok | failed (some checkpoint failed) | interrupted
    pid             INTEGER,
    found           INTEGER,              -- checkpoints found under watch_dir
    processed       INTEGER,              -- ... run through every stage by this run
    failed          INTEGER,
    settings        JSON
);
CREATE TABLE IF NOT EXISTS watch_checkpoints (
    path            VARCHAR PRIMARY KEY,  -- a checkpoint directory (absolute)
    watch_dir       VARCHAR,
    series          VARCHAR,              -- its parent directory: one training run
    step            BIGINT,               -- from checkpoint-STEP / step-STEP / trainer_state.json (NULL: none)
    signature       VARCHAR,              -- sha256 of the names, sizes and mtimes of config + weight files
    checkpoint_id   VARCHAR,              -- content hash (NULL if it failed before hashing)
    status          VARCHAR,              -- done | failed
    error           VARCHAR,              -- why it failed (one line)
    prev_checkpoint_id VARCHAR,           -- the series' previous processed checkpoint (tracking)
    pass_id         VARCHAR,              -- the corpus pass, verify run and report it got
    verify_id       VARCHAR,
    report          VARCHAR,
    run_id          VARCHAR,              -- the watch run that processed it
    processed_at    TIMESTAMP
);
CREATE TABLE IF NOT EXISTS watch_results (
    run_id          VARCHAR,
    path            VARCHAR,
    step            BIGINT,
    checkpoint_id   VARCHAR,
    status          VARCHAR,              -- done | failed | unchanged (same content hash, new file times)
    error           VARCHAR,
    stages          JSON,                 -- per stage: status and seconds; tracking counts
    seconds         DOUBLE,
    finished_at     TIMESTAMP,
    PRIMARY KEY (run_id, path)
);
CREATE TABLE IF NOT EXISTS neuron_matches (
    checkpoint_id   VARCHAR,              -- the newer checkpoint
    prev_checkpoint_id VARCHAR,           -- the previous checkpoint of the same run
    layer           SMALLINT,
    neuron          INTEGER,
    prev_neuron     INTEGER,              -- its match in the same layer of prev_checkpoint_id
    similarity      DOUBLE,               -- (cos_out + cos_in) / 2 (cos_out alone if cos_in is NULL)
    cos_out         DOUBLE,               -- cos(w_out, w_out') of the processed weights
    cos_in          DOUBLE,               -- cos(w_in, w_in')
    mutual          BOOLEAN               -- the partner's best match is this neuron too
);
CREATE TABLE IF NOT EXISTS neuron_changes (
    checkpoint_id   VARCHAR,
    prev_checkpoint_id VARCHAR,
    layer           SMALLINT,
    neuron          INTEGER,              -- NULL for a lost verdict whose neuron no longer matches
    prev_neuron     INTEGER,
    change          VARCHAR,              -- role_gained | role_lost | verdict_confirmed | verdict_lost | moved
    subject         VARCHAR,              -- the role; "kind: subject" of a verdict; the statistic that moved
    old_value       DOUBLE,               -- role score before / statistic before
    new_value       DOUBLE,
    score           DOUBLE,               -- role score; match similarity (verdicts); standardised change (moved)
    detail          VARCHAR
);
CREATE TABLE IF NOT EXISTS prediction_curves (
    pass_id         VARCHAR,
    checkpoint_id   VARCHAR,
    layer           SMALLINT,
    neuron          INTEGER,
    token_id        INTEGER,
    token           VARCHAR,
    source          VARCHAR,              -- prediction | suppression (scan candidates) | pair (--pair)
    bin             SMALLINT,             -- same bins as activation_histograms (only non-empty)
    lo              DOUBLE,
    hi              DOUBLE,
    positions       BIGINT,               -- positions whose activation falls in the bin
    top_prediction  BIGINT,               -- ... where the token is the model's top prediction
    with_next       BIGINT,               -- ... where the next token is known
    is_next         BIGINT                -- ... where the token is the true next token
);
CREATE TABLE IF NOT EXISTS universality_runs (
    universality_id VARCHAR PRIMARY KEY,
    models          JSON,                 -- [{spec, checkpoint_id, n_layers, d_mlp}], in the order given
    corpus_fingerprint VARCHAR,
    corpus          JSON,
    split           VARCHAR,
    tokens          BIGINT,               -- positions correlated: document tokens (BOS and padding excluded)
    settings        JSON,                 -- seed, threshold, context, batch_size, memory_gb, passes, bos excluded
    created_at      TIMESTAMP,
    seconds         DOUBLE,
    discover_version VARCHAR
);
CREATE TABLE IF NOT EXISTS neuron_correlations (
    universality_id VARCHAR,
    checkpoint_id   VARCHAR,              -- the neuron's model
    layer           SMALLINT,
    neuron          INTEGER,
    other_checkpoint_id VARCHAR,          -- one other model of the run (one row per other model)
    max_corr        DOUBLE,               -- max Pearson correlation over the other model's neurons, all layers
    partner_layer   SMALLINT,             -- the other model's neuron reaching max_corr
    partner_neuron  INTEGER,
    baseline_corr   DOUBLE,               -- the same max after a Haar-random rotation of each of its layers
    excess          DOUBLE                -- max_corr - baseline_corr (all NULL for a dead neuron)
);
CREATE TABLE IF NOT EXISTS universal_neurons (
    universality_id VARCHAR,
    checkpoint_id   VARCHAR,
    layer           SMALLINT,
    neuron          INTEGER,
    mean_max_corr   DOUBLE,               -- means over the run's other models
    mean_baseline   DOUBLE,
    mean_excess     DOUBLE,
    universal       BOOLEAN               -- mean_excess > settings.threshold (false for a dead neuron)
);
"""

#: tables whose rows belong to one checkpoint (deleted together on a rescan)
CHECKPOINT_TABLES = ("neurons", "neuron_tokens", "roles", "token_neurons", "tokens")

STAT_COLUMNS = (
    "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt",
    "w_in_norm", "w_out_norm", "cos_in_out", "w_up_norm", "cos_up_out",
)


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The store directory: `root`, else $DISCOVER_STORE, else ./indexes."""
    return Path(root or os.environ.get("DISCOVER_STORE") or DEFAULT_STORE).expanduser()


class Store:
    """An explicit handle on a store directory. Use as a context manager."""

    def __init__(self, root: str | os.PathLike | None = None, *, read_only: bool = False):
        self.root = resolve_root(root)
        self.read_only = read_only
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path {self.root} is a file; --store must name a directory")
        self.path = self.root / CATALOG
        if read_only:
            if not self.path.exists():
                raise NotScanned(
                    f"store {self.root} has no catalog yet; run `discover scan MODEL` first "
                    "(or pass --store / set DISCOVER_STORE to the store you scanned into)"
                )
        else:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store directory {self.root} ({e.strerror})") from None
        self.con = self._connect()
        if not read_only:
            import duckdb

            try:
                self.con.execute(SCHEMA)
                self._remove_orphans()
            except duckdb.Error as e:
                self.close()
                raise StoreError(
                    f"{self.path} is not a discover catalog ({first_line(e, 200)}); "
                    "point --store at another directory"
                ) from None

    @classmethod
    def reader(cls, root: str | os.PathLike, con) -> "Store":
        """A read-only handle over an open DuckDB connection (e.g. a cursor on `discover serve`'s
        snapshot of the catalog); files are read from `root`."""
        self = cls.__new__(cls)
        self.root, self.read_only, self.path, self.con = Path(root), True, None, con
        return self

    def _connect(self):
        import time

        import duckdb

        try:
            wait = float(os.environ.get("DISCOVER_LOCK_WAIT", LOCK_WAIT_S))
        except ValueError:
            wait = LOCK_WAIT_S
        if not 0 <= wait < float("inf"):  # NaN, negative or infinite: the default
            wait = LOCK_WAIT_S
        deadline, delay = time.monotonic() + wait, 0.02
        while True:  # another process's short write (or `discover serve` refreshing its snapshot): wait for it
            try:
                if self.read_only:
                    return duckdb.connect(str(self.path), read_only=True)
                return duckdb.connect(str(self.path))
            except duckdb.IOException as e:
                if "lock" not in str(e).lower():
                    raise StoreError(f"cannot open catalog {self.path} ({first_line(e, 200)})") from None
                if time.monotonic() + delay > deadline:
                    raise StoreBusy(
                        f"store {self.root} is in use by another discover process (waited {wait:g} s); "
                        "wait for it to finish") from None
            except duckdb.Error as e:
                raise StoreError(
                    f"{self.path} is not a readable DuckDB catalog ({first_line(e, 200)}); "
                    "point --store at another directory"
                ) from None
            time.sleep(delay)
            delay = min(2 * delay, 0.5)

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ files
    def files_dir(self, checkpoint: dict) -> Path:
        return self.root / "checkpoints" / checkpoint["files_dir"]

    def _remove_orphans(self) -> None:
        """Delete checkpoint directories that no committed row points at (killed scans)."""
        d = self.root / "checkpoints"
        if d.is_dir():
            live = {r[0] for r in self.con.execute("SELECT files_dir FROM checkpoints").fetchall()}
            for sub in d.iterdir():
                if sub.name not in live:
                    shutil.rmtree(sub, ignore_errors=True)
        d = self.root / "activations"
        if d.is_dir():
            live = dict(self.con.execute("SELECT files_dir, results_dir FROM activation_passes").fetchall())
            for sub in d.iterdir():
                if sub.name not in live:
                    shutil.rmtree(sub, ignore_errors=True)
                    continue
                for f in sub.iterdir():  # superseded results, half-written state files
                    if (f.name.startswith("results-") and f.name != live[sub.name]) or f.name.endswith(".tmp"):
                        shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)

    # ---------------------------------------------------------------- lookups
    def has_table(self, name: str) -> bool:
        """Whether the catalog has table `name` (a read-only handle on a catalog written by an
        older version lacks the newer tables)."""
        return bool(self.con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                                     [name]).fetchone()[0])

    def checkpoint(self, checkpoint_id: str) -> dict | None:
        cur = self.con.execute("SELECT * FROM checkpoints WHERE checkpoint_id = ?", [checkpoint_id])
        return fetch_dict(cur, ("config", "scan_settings", "role_thresholds", "neuron_layout"))

    def resolve_model(self, model: str) -> dict:
        """The checkpoint row for a model spec (latest scan of that spec), or a checkpoint id."""
        from discover.adapter import normalise_spec

        spec = normalise_spec(model)
        row = self.con.execute(
            "SELECT checkpoint_id FROM models WHERE spec = ? ORDER BY seen_at DESC LIMIT 1", [spec]
        ).fetchone()
        if row is None and len(model) >= 8 and all(c in "0123456789abcdef" for c in model):
            rows = self.con.execute(
                "SELECT checkpoint_id FROM checkpoints WHERE checkpoint_id LIKE ? || '%'", [model]
            ).fetchall()
            if len(rows) > 1:
                raise QueryError(f"checkpoint id prefix {model} matches {len(rows)} checkpoints; give more digits")
            row = rows[0] if rows else None
        if row is None:
            raise NotScanned(
                f"model {model} has not been scanned into store {self.root}; run `discover scan {model}` first"
            )
        return self.checkpoint(row[0])

    def checkpoints(self) -> list[dict]:
        ids = [r[0] for r in self.con.execute("SELECT checkpoint_id FROM checkpoints ORDER BY scanned_at").fetchall()]
        return [self.checkpoint(i) for i in ids]

    def add_alias(self, spec: str, checkpoint_id: str) -> None:
        self.con.execute(
            "INSERT INTO models VALUES (?, ?, now()) ON CONFLICT (spec, checkpoint_id) DO UPDATE SET seen_at = now()",
            [spec, checkpoint_id],
        )

    # ----------------------------------------------------------------- writes
    def write_scan(self, view, result, config, *, spec: str) -> dict:
        """Insert one scan (rows + FAISS index + tokenizer) as one transaction."""
        import faiss
        import pyarrow as pa

        from discover import __version__
        from discover.roles import assign_roles

        ckpt = view.checkpoint_id
        n, L = view.d_mlp, view.n_layers
        files_dir = f"{ckpt[:16]}-{uuid.uuid4().hex[:8]}"
        fdir = self.root / "checkpoints" / files_dir
        fdir.mkdir(parents=True)
        try:
            # -- files first (unreferenced until the commit below)
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(view.d_model))
            for lr in result.layers:
                index.add_with_ids(lr.w_out_unit, np.arange(lr.layer * n, (lr.layer + 1) * n, dtype=np.int64))
            faiss.write_index(index, str(fdir / "w_out.faiss"))
            if all(lr.w_in_unit is not None for lr in result.layers):  # neuron tracking (discover watch)
                np.save(fdir / "w_in.npy", np.concatenate([lr.w_in_unit for lr in result.layers]))
            if view.tokenizer is not None:
                view.tokenizer.save_pretrained(str(fdir / "tokenizer"))
            _write_arrays(fdir / "arrays", result, view)

            # -- rows
            strings = view.token_strings()
            str_arr = pa.array(strings, type=pa.string())
            stats = {c: np.concatenate([lr.stats.get(c, np.full(n, np.nan)) for lr in result.layers])
                     for c in STAT_COLUMNS}
            role_rows, primary = assign_roles(stats, view.d_model, config.roles)
            layer_col = np.repeat(np.arange(L, dtype=np.int16), n)
            neuron_col = np.tile(np.arange(n, dtype=np.int32), L)
            neurons = pa.table({
                "layer": layer_col, "neuron": neuron_col,
                # NULL, not NaN, where a statistic does not apply (DuckDB orders NaN above every number)
                **{c: pa.array(stats[c], mask=np.isnan(stats[c])) for c in STAT_COLUMNS},
                "role": pa.array(primary.tolist(), type=pa.string()),
            })
            nt = _neuron_tokens_table(result, str_arr, view)
            roles = _roles_table(role_rows, np.arange(n * L), n)
            tn = _token_neurons_table(result, n)
            toks = pa.table({
                "token_id": np.arange(len(strings), dtype=np.int32),
                "token": pa.array(strings, type=pa.string()),
                "unembed_norm": result.unembed_norms.astype(np.float32),
            })
            vocab_hash = _sha256("\0".join(strings))
            cfg = view.model.config.to_dict()
            row = [
                ckpt, view.architecture, L, view.d_model, n, view.d_vocab, view.act_name,
                view.final_norm().kind, view.gated, vocab_hash, json.dumps(cfg, default=str),
                json.dumps(config.compute_key()), json.dumps(asdict(config.roles)), files_dir,
                float(result.seconds), __version__, view.source["format"], view.source["quantization"],
                json.dumps(view.layout.to_dict()) if view.layout.moe else None,
            ]
            old = self.checkpoint(ckpt)
            with transaction(self.con) as con:
                for t in CHECKPOINT_TABLES:
                    con.execute(f"DELETE FROM {t} WHERE checkpoint_id = ?", [ckpt])
                con.execute("DELETE FROM checkpoints WHERE checkpoint_id = ?", [ckpt])
                con.execute(
                    "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), ?, ?, ?, ?, ?)", row
                )
                for name, tbl in (("neurons", neurons), ("neuron_tokens", nt), ("roles", roles),
                                  ("token_neurons", tn), ("tokens", toks)):
                    # the checkpoint id is filled in SQL: no column of millions of equal strings
                    insert_arrow(con, name, tbl, constants={"checkpoint_id": ckpt})
                self.add_alias(spec, ckpt)
        except BaseException:
            shutil.rmtree(fdir, ignore_errors=True)
            raise
        if old is not None and old["files_dir"] != files_dir:
            shutil.rmtree(self.root / "checkpoints" / old["files_dir"], ignore_errors=True)
        return self.checkpoint(ckpt)

    def rederive_roles(self, checkpoint: dict, thresholds) -> None:
        """Recompute role hypotheses from stored statistics (new thresholds, no rescan)."""
        import pyarrow as pa

        from discover.roles import assign_roles

        ckpt, n = checkpoint["checkpoint_id"], checkpoint["d_mlp"]
        cols = ", ".join(STAT_COLUMNS)
        tbl = self.con.execute(
            f"SELECT layer, neuron, {cols} FROM neurons WHERE checkpoint_id = ? ORDER BY layer, neuron", [ckpt]
        ).fetchnumpy()
        stats = {c: np.asarray(tbl[c], dtype=np.float64) for c in STAT_COLUMNS}
        role_rows, primary = assign_roles(stats, checkpoint["d_model"], thresholds)
        gid = np.asarray(tbl["layer"], dtype=np.int64) * n + np.asarray(tbl["neuron"], dtype=np.int64)
        prim = pa.table({"layer": (gid // n).astype(np.int16), "neuron": (gid % n).astype(np.int32),
                         "role": pa.array(primary.tolist(), type=pa.string())})
        roles = _roles_table(role_rows, gid, n)
        with transaction(self.con) as con:
            con.execute("DELETE FROM roles WHERE checkpoint_id = ?", [ckpt])
            insert_arrow(con, "roles", roles, constants={"checkpoint_id": ckpt})
            con.register("_prim", prim)
            con.execute(
                "UPDATE neurons SET role = _prim.role FROM _prim WHERE neurons.checkpoint_id = ? "
                "AND neurons.layer = _prim.layer AND neurons.neuron = _prim.neuron", [ckpt]
            )
            con.unregister("_prim")
            con.execute("UPDATE checkpoints SET role_thresholds = ? WHERE checkpoint_id = ?",
                        [json.dumps(asdict(thresholds)), ckpt])


#: per-neuron statistics kept in arrays/neuron_stats.npy, in this column order
ARRAY_STATS = ("vocab_kurt", "vocab_skew", "vocab_var", "w_out_norm", "cos_in_out")


def _write_arrays(adir: Path, result, view) -> None:
    """The hot path of `query token` as .npy files (memory-mapped by readers):
    token_neurons (2, K, vocab) int32 global ids [sign +1, -1]; token_congruence (2, K, vocab);
    neuron_tokens (neuron, 2, k) int32 token ids [top, bottom]; neuron_stats (neuron, 5) float64
    (ARRAY_STATS); tokens.json the decoded token strings; single_tokens.json {text: id} for every
    token whose decoded text the tokenizer splits into exactly that token (checked here, so that a
    query for one token's text needs no tokenizer)."""
    adir.mkdir()
    np.save(adir / "token_neurons.npy", np.stack([result.token_top[0], result.token_bottom[0]]).astype(np.int32))
    np.save(adir / "token_congruence.npy", np.stack([result.token_top[1], result.token_bottom[1]]).astype(np.float32))
    np.save(adir / "neuron_tokens.npy", np.concatenate(
        [np.stack([lr.top_ids, lr.bottom_ids], axis=1) for lr in result.layers]).astype(np.int32))
    np.save(adir / "neuron_stats.npy", np.stack(
        [np.concatenate([lr.stats[c] for lr in result.layers]) for c in ARRAY_STATS], axis=1).astype(np.float64))
    strings = view.token_strings()
    (adir / "tokens.json").write_text(json.dumps(strings))
    if view.tokenizer is not None:  # texts that are one token, as the tokenizer itself splits them
        from discover.tokens import one_token_texts

        (adir / "single_tokens.json").write_text(json.dumps(one_token_texts(view.tokenizer, strings)))


def _roles_table(role_rows: list, gid: np.ndarray, n: int):
    """Arrow rows of the `roles` table but its checkpoint id; role_rows index into `gid` (global ids
    layer * n + neuron)."""
    import pyarrow as pa

    g = gid[np.array([r[0] for r in role_rows], dtype=np.int64)] if role_rows else np.zeros(0, np.int64)
    return pa.table({
        "layer": (g // n).astype(np.int16),
        "neuron": (g % n).astype(np.int32),
        "role": pa.array([r[1] for r in role_rows], type=pa.string()),
        "score": pa.array([r[2] for r in role_rows], type=pa.float64()),
    })


PASS_JSON = ("corpus", "settings")  # the JSON columns of activation_passes


def fetch_dict(cur, json_columns=()) -> dict | None:
    """The cursor's next row as {column: value} with the JSON columns parsed (None: no row)."""
    row = cur.fetchone()
    if row is None:
        return None
    out = dict(zip([c[0] for c in cur.description], row))
    for k in json_columns:
        if isinstance(out.get(k), str):
            out[k] = json.loads(out[k])
    return out


@contextmanager
def transaction(con):
    """BEGIN ... COMMIT, rolled back on any exception (a KeyboardInterrupt too)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        raise


def insert_arrow(con, table: str, tbl, constants: dict | None = None) -> None:
    """INSERT an Arrow table's rows BY NAME into `table` (inside the caller's transaction);
    `constants` {column: value} fill columns that are the same on every row (no repeated array)."""
    consts = constants or {}
    extra = "".join(f", ? AS {c}" for c in consts)
    con.register("_incoming", tbl)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT *{extra} FROM _incoming", list(consts.values()))
    finally:
        con.unregister("_incoming")


def _rollback(con) -> None:
    """Roll back if a transaction is still open (a failed COMMIT has already ended it)."""
    import duckdb

    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


def _sha256(s: str) -> str:
    import hashlib

    return hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()


def _neuron_tokens_table(result, str_arr, view):
    import pyarrow as pa

    parts = []
    n = view.d_mlp
    for lr in result.layers:
        k = lr.top_ids.shape[1]
        for side, ids, vals in (("top", lr.top_ids, lr.top_vals), ("bottom", lr.bottom_ids, lr.bottom_vals)):
            flat_ids = ids.reshape(-1)
            norms = result.unembed_norms[flat_ids] * np.repeat(lr.stats["w_out_norm"], k)
            with np.errstate(divide="ignore", invalid="ignore"):
                cos = np.where(norms > 0, vals.reshape(-1) / norms, 0.0)
            parts.append(pa.table({
                "layer": np.full(n * k, lr.layer, dtype=np.int16),
                "neuron": np.repeat(np.arange(n, dtype=np.int32), k),
                "side": pa.repeat(pa.scalar(side), n * k),
                "rank": np.tile(np.arange(k, dtype=np.int16), n),
                "token_id": flat_ids.astype(np.int32),
                "token": str_arr.take(pa.array(flat_ids)),
                "congruence": vals.reshape(-1).astype(np.float32),
                "cosine": cos.astype(np.float32),
            }))
    return pa.concat_tables(parts)


def _token_neurons_table(result, n):
    import pyarrow as pa

    parts = []
    for sign, (ids, vals) in ((1, result.token_top), (-1, result.token_bottom)):
        K, V = ids.shape
        g = np.ascontiguousarray(ids.T, dtype=np.int32).reshape(-1)  # token-major: one token's rows together
        layer, neuron = np.divmod(g, np.int32(n))
        parts.append(pa.table({
            "token_id": np.repeat(np.arange(V, dtype=np.int32), K),
            "sign": np.full(V * K, sign, dtype=np.int8),
            "rank": np.tile(np.arange(K, dtype=np.int16), V),
            "layer": layer.astype(np.int16),
            "neuron": neuron,
            "congruence": np.ascontiguousarray(vals.T, dtype=np.float32).reshape(-1),
        }))
    return pa.concat_tables(parts)
