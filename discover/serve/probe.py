"""The interactive probe: type text, see one neuron's activation on every token and the strongest
neurons at one position. The model of a checkpoint loads on first use, once per server, on the
server's device; everything else the server does needs no model."""

from __future__ import annotations

import threading

from discover.errors import QueryError

MAX_TOKENS = 512  # a probe's text is cut to this many tokens


class Prober:
    def __init__(self, device: str | None = None, max_models: int = 2):
        self.device = device
        self.max_models = max_models
        self._views: dict = {}  # checkpoint id -> (ModelView, its lock), oldest first
        self._lock = threading.Lock()

    def view(self, store, ckpt: dict):
        cid = ckpt["checkpoint_id"]
        with self._lock:  # one load at a time; a second request for the same model waits for it
            if cid in self._views:
                return self._views[cid]
            from discover.adapter import load_model

            specs = [r[0] for r in store.con.execute(
                "SELECT spec FROM models WHERE checkpoint_id = ? ORDER BY seen_at DESC", [cid]).fetchall()]
            if not specs:
                raise QueryError(f"no model path is recorded for checkpoint {cid[:12]}")
            if self.device is None:  # the default: a GPU where there is one
                import torch

                self.device = "cuda" if torch.cuda.is_available() else "cpu"
            view = load_model(specs[0], device=self.device)
            if view.checkpoint_id != cid:
                raise QueryError(f"the model at {specs[0]} changed since it was scanned (checkpoint "
                                 f"{view.checkpoint_id[:12]}, not {cid[:12]}); scan it again to probe it")
            while len(self._views) >= self.max_models:
                self._views.pop(next(iter(self._views)))
            self._views[cid] = (view, threading.Lock())  # the lock: hooks on one model, one trace at a time
            return self._views[cid]

    def probe(self, store, ckpt: dict, text: str, *, neuron: tuple[int, int] | None = None,
              position: int | None = None, top: int = 10) -> dict:
        """Activations of `text` (the corpus pass's way: BOS, else EOS, first): the neuron's value on
        every token, and at `position` (default: the last token) the `top` highest and lowest
        activations over every neuron of every layer."""
        import numpy as np
        import torch

        from discover.tokens import bos_id

        if not text:
            raise QueryError("the probe's text is empty; type some text")
        if not 1 <= top <= 100:
            raise QueryError("top must be between 1 and 100")
        view, lock = self.view(store, ckpt)
        all_ids = view.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = all_ids[:MAX_TOKENS]
        if not ids:
            raise QueryError("the text tokenizes to nothing; type other text")
        b = bos_id(view.tokenizer)
        seq = ([b] if b is not None else []) + [int(i) for i in ids]
        start = len(seq) - len(ids)
        with lock, torch.inference_mode():  # hooks are registered on the shared model: one trace at a time
            tr = view.trace(torch.tensor([seq], device=next(view.model.parameters()).device))
            acts = np.stack([tr.acts[l][0, start:].float().cpu().numpy() for l in range(view.n_layers)])  # (L, T, N)
        strings = view.token_strings()
        pos = len(ids) - 1 if position is None else position
        if not 0 <= pos < len(ids):
            raise QueryError(f"position {pos} is outside the text's {len(ids)} tokens (0-{len(ids) - 1})")
        flat = acts[:, pos, :].reshape(-1)
        N = acts.shape[2]
        order = np.argsort(-flat, kind="stable")

        def rows(idx):
            return [{"neuron": view.layout.name(int(g) // N, int(g) % N), "layer": int(g) // N,
                     "neuron_index": int(g) % N, "activation": float(flat[g])} for g in idx]

        out = {"checkpoint_id": ckpt["checkpoint_id"], "text": text, "truncated": len(all_ids) > MAX_TOKENS,
               "tokens": [{"position": i, "token_id": t, "token": strings[t]} for i, t in enumerate(ids)],
               "position": pos, "top": rows(order[:top]), "bottom": rows(order[::-1][:top])}
        if neuron is not None:
            layer, n = neuron
            out["neuron"] = view.layout.name(layer, n)
            out["values"] = [float(v) for v in acts[layer, :, n]]
        return out
