"""Reports: the numbers on the page are the catalog's; markdown and JSON formats; token and corpus
text full of markup stays text (the HTML carries it only inside an escaped JSON block, and the
page's script builds the DOM with textContent: run under Node with a fake DOM when Node exists)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_cli import run, sql_rows

EVIL = ["<script>alert(1)</script>", '"><img', "src=x", "onerror=alert(2)>", "</script><b>", "&amp;", "<!--",
        "<script>document.title='PWNED'</script>", '"><svg/onload=document.title=`PWNED`>',
        "<img/src=x/onerror=document.title='PWNED'>"]
WORDS = ["<|endoftext|>"] + EVIL + ["the", "a", "tree", "apple", "an", "picked", "and", "of", "1999", "42"] + [
    f"w{i}" for i in range(60)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<|endoftext|>")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from discover.activations import ActivationConfig, run_activations
    from discover.store import Store
    from discover.verify import VerifyConfig, verify_model

    d = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=len(WORDS),
                                       n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    mdir = d / "model"
    model.save_pretrained(str(mdir), safe_serialization=True)
    _tokenizer().save_pretrained(str(mdir))
    rng = random.Random(0)
    corpus = d / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS[1:]) for _ in range(rng.randint(20, 90))))
    store = d / "store"
    with Store(store) as st:
        run_activations(str(mdir), st, ActivationConfig(tokens=2000, batch_size=4, context=32), corpus=str(corpus),
                        progress=False)
        verify_model(str(mdir), st, VerifyConfig(tokens=2000, split="all", candidates=3, controls=5, per_rule=2),
                     corpus=str(corpus), progress=False)
    return d, mdir, store


def _payload(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_html_numbers_equal_the_catalog(env, capsys):
    d, mdir, store = env
    out = d / "r.html"
    rc, so, err = run(capsys, "report", mdir, "--store", store, "--out", out)
    assert rc == 0, err
    page = out.read_text()
    rep = _payload(page)
    assert rep["cards"], "no cards"
    for card in rep["cards"][:10]:
        l, n = card["layer"], card["index"]
        (kurt, skew), = sql_rows(store, "SELECT vocab_kurt, vocab_skew FROM neurons WHERE layer = ? AND neuron = ?",
                                 [l, n])
        assert card["stats"]["vocab_kurt"] == pytest.approx(kurt) and card["stats"]["vocab_skew"] == pytest.approx(skew)
        (mean, k), = sql_rows(store, "SELECT act_mean, act_kurt FROM neuron_activations WHERE layer = ? AND neuron = ?",
                              [l, n])
        assert card["activation"]["act_mean"] == pytest.approx(mean)
        vals = [r[0] for r in sql_rows(store, "SELECT value FROM activation_examples WHERE layer = ? AND neuron = ? "
                                              "AND kind = 'activation' ORDER BY rank LIMIT 8", [l, n])]
        assert [e["value"] for e in card["examples"]] == pytest.approx(vals)
        assert sum(card["vocab_effect"]["counts"]) == len(WORDS)
    total = sql_rows(store, "SELECT verdict, count(*) FROM hypotheses GROUP BY verdict")
    got = {}
    for kinds in rep["summary"]["verdict_counts"].values():
        for v, c in kinds.items():
            got[v] = got.get(v, 0) + c
    assert {v: c for v, c in total} == {v: c for v, c in got.items() if c}
    order = {"confirmed": 0, "inconclusive": 1, "rejected": 2}
    ranks = [min([order[v["verdict"]] for v in c["verdicts"]] or [3]) for c in rep["cards"]]
    assert ranks == sorted(ranks), "cards are not ranked by verdict"
    assert len(rep["summary"]["scatter"]["kurtosis"]) == 2 * 64


def test_markup_in_tokens_and_text_stays_text(env, capsys):
    d, mdir, store = env
    out = d / "evil.html"
    assert run(capsys, "report", mdir, "--store", store, "--out", out)[0] == 0
    page = out.read_text()
    for bad in ("<script>alert", "<img", "onerror=alert(2)>", "</script><b>", "<!--"):
        assert bad not in page, bad
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data block and the page's script
    rep = _payload(page)
    shown = json.dumps(rep)
    assert "<script>alert(1)</script>" in shown or "onerror=alert(2)>" in shown, "the markup tokens are not in the report"
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed: the page's script was not run")
    res = subprocess.run([node, str(Path(__file__).parent / "js" / "fake_dom.js"), str(out)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = json.loads(res.stdout)
    assert dom["ok"] and dom["cards"] == min(25, len(rep["cards"]))
    assert any(t in dom["cardsText"] for t in EVIL), "the markup tokens are not shown as text"
    # no watch or universality data: their panels stay hidden, and the stylesheet lets `hidden` win
    # over the rows' and panels' own `display` (else an empty row of panels shows)
    assert dom["changesShown"] is False and dom["universality"] == 0
    assert "[hidden]{display:none!important}" in page


def test_markdown_and_json(env, capsys):
    d, mdir, store = env
    assert run(capsys, "report", mdir, "--store", store, "--format", "md", "--out", d / "r.md", "--cards", 5)[0] == 0
    md = (d / "r.md").read_text()
    assert md.startswith("# discover report") and md.count("\n### L") == 5
    assert "<script>" not in md and "<img" not in md
    assert run(capsys, "report", mdir, "--store", store, "--format", "json", "--out", d / "r.json", "--cards", 4)[0] == 0
    rep = json.loads((d / "r.json").read_text())
    assert len(rep["cards"]) == 4 and rep["verify"]["tokens"] > 0 and rep["corpus_pass"]["tokens"] > 0


def test_report_bad_input(env, capsys, tmp_path):
    from test_cli import assert_one_error_line

    d, mdir, store = env
    rc, out, err = run(capsys, "report", mdir, "--store", store, "--out", tmp_path / "no" / "dir" / "r.html")
    assert_one_error_line(rc, err, "does not exist")
    rc, out, err = run(capsys, "report", mdir, "--store", store, "--cards", 0, "--out", tmp_path / "r.html")
    assert_one_error_line(rc, err, "--cards")
    rc, out, err = run(capsys, "report", mdir, "--store", tmp_path / "empty", "--out", tmp_path / "r.html")
    assert_one_error_line(rc, err, "no catalog")


def test_discover_run_end_to_end_through_the_entry_point(env, tmp_path):
    """`python -m discover run` on a tiny model and corpus: every stage, a report, a summary; the
    rerun reuses everything in the store."""
    import sys

    d, mdir, _ = env
    store, out = tmp_path / "store", tmp_path / "main.html"
    argv = [sys.executable, "-m", "discover", "run", str(mdir), "--corpus", str(d / "corpus"), "--tokens", "1500",
            "--verify-tokens", "1500", "--verify-split", "all", "--candidates", "3", "--store", str(store),
            "--out", str(out)]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("[1/4] scan", "[2/4] activations", "[3/4] verify", "[4/4] report"):
        assert stage in first.stderr
    assert "report: " + str(out.resolve()) in first.stdout
    assert _payload(out.read_text())["cards"]
    second = subprocess.run(argv + ["--json"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    res = json.loads(second.stdout)
    assert {k: v["status"] for k, v in res["stages"].items()} == {
        "scan": "unchanged", "activations": "unchanged", "verify": "unchanged", "report": "written"}


def test_run_with_no_held_out_documents_is_one_line_and_writes_nothing(env, tmp_path, capsys):
    from test_cli import assert_one_error_line

    d, mdir, _ = env
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "only.txt").write_text("the apple tree and the " * 20)
    rc, out, err = run(capsys, "run", mdir, "--corpus", tiny, "--store", tmp_path / "s", "--out", tmp_path / "r.html")
    assert_one_error_line(rc, err, "heldout split", "--verify-split all")
    assert not (tmp_path / "s").exists() and not (tmp_path / "r.html").exists()


def test_report_in_a_real_browser(env, capsys):
    """Headless Chromium (Debian `chromium`; tests/setup_system.sh installs it) loads the page with
    its markup-laden tokens: no injected script runs (they would retitle the page), the cards are
    drawn, the tokens show as text. A screenshot is kept in tests/artifacts/."""
    browser = shutil.which("chromium")  # Debian's; Ubuntu's chromium-browser may be a snap stub
    if browser is None:
        pytest.skip("chromium is not installed: run tests/setup_system.sh (CI does)")
    d, mdir, store = env
    out = d / "browser.html"
    assert run(capsys, "report", mdir, "--store", store, "--out", out)[0] == 0
    n_cards = len(_payload(out.read_text())["cards"])
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--virtual-time-budget=5000", f"--user-data-dir={d / 'chromium-profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html_after = dom.stdout
    title = re.search(r"<title>(.*?)</title>", html_after, re.S).group(1)
    assert "PWNED" not in title and title.startswith("discover report")
    assert html_after.count('class="card"') == min(25, n_cards)  # the script ran and drew the first page
    assert "&lt;script&gt;document.title" in html_after  # shown as text
    for injected in ("<svg/onload", "<img/src", "<script>document", "<script>alert"):
        assert injected not in html_after, injected
    art = Path(__file__).parent / "artifacts"
    art.mkdir(exist_ok=True)
    shot = art / "report_markup_safety.png"
    res = subprocess.run([browser, *flags, "--window-size=1280,1600", f"--screenshot={shot}", out.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and shot.stat().st_size > 10_000, res.stderr[-2000:]


def test_cards_show_stored_patching_results(env, capsys, tmp_path):
    d, mdir, store = env
    work = tmp_path / "store"
    shutil.copytree(store, work)
    res = json.loads(run(capsys, "patch", mdir, "--clean", "the apple tree and the", "--corrupted",
                         "the w3 tree and the", "--target", "an", "--contrast", "a", "--store", work, "--json")[1])
    out = tmp_path / "r.json"
    assert run(capsys, "report", mdir, "--store", work, "--format", "json", "--out", out)[0] == 0
    rep = json.loads(out.read_text())
    card = rep["cards"][0]
    (rec, att), = sql_rows(work, "SELECT recovery, attribution FROM patch_results WHERE experiment_id = ? AND "
                                 "layer = ? AND neuron = ?", [res["experiment_id"], card["layer"], card["index"]])
    got = [x for x in card["patching"] if x["experiment_id"] == res["experiment_id"]]
    assert got and got[0]["recovery"] == pytest.approx(rec) and got[0]["attribution"] == pytest.approx(att)
    assert got[0]["target"] == "an" and got[0]["positions"] == "last"


def test_run_reuses_its_own_verify_run_and_keeps_scan_settings(env, tmp_path, capsys, monkeypatch):
    """`discover run` after a `discover verify` with other settings reuses its own earlier verify
    run and reports those verdicts; a scan with custom thresholds keeps them; --format md -> .md."""
    d, mdir, _ = env
    store = tmp_path / "store"
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "scan", mdir, "--store", store, "--kurtosis", "2.5", "--json")[0] == 0
    thresholds = sql_rows(store, "SELECT role_thresholds FROM checkpoints")[0][0]
    base = ["run", mdir, "--corpus", d / "corpus", "--tokens", 1500, "--verify-tokens", 1500, "--verify-split", "all",
            "--candidates", 2, "--store", store]
    first = json.loads(run(capsys, *base, "--json")[1])
    assert sql_rows(store, "SELECT role_thresholds FROM checkpoints")[0][0] == thresholds
    assert run(capsys, "verify", mdir, "--corpus", d / "corpus", "--split", "all", "--tokens", 800, "--store", store,
               "--json")[0] == 0
    second = json.loads(run(capsys, *base, "--format", "md", "--json")[1])
    assert second["stages"]["verify"] == {**second["stages"]["verify"], "status": "unchanged",
                                          "verify_id": first["stages"]["verify"]["verify_id"]}
    assert second["report"].endswith("report.md") and Path(second["report"]).read_text().startswith("# discover")


def test_report_of_a_scan_only_store_draws(env, tmp_path, capsys):
    """No corpus pass, no verify run: the page still draws (role candidates only, or no cards)."""
    d, mdir, _ = env
    store = tmp_path / "store"
    assert run(capsys, "scan", mdir, "--store", store, "--kurtosis", "2.5", "--json")[0] == 0
    out = tmp_path / "r.html"
    assert run(capsys, "report", mdir, "--store", store, "--out", out)[0] == 0
    rep = _payload(out.read_text())
    assert rep["verify"] is None and rep["corpus_pass"] is None and rep["cards"]
    assert all("examples" not in c for c in rep["cards"])
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed")
    res = subprocess.run([node, str(Path(__file__).parent / "js" / "fake_dom.js"), str(out)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and json.loads(res.stdout)["ok"], res.stderr[-2000:]


def _chromium():
    browser = shutil.which("chromium")  # Debian's; Ubuntu's chromium-browser may be a snap stub
    if browser is None:
        pytest.skip("chromium is not installed: run tests/setup_system.sh (CI does)")
    return browser


MEASURE = """<script>(function(){const over=[...document.querySelectorAll(".panel")].map(p=>p.scrollWidth-p.clientWidth);
const t=document.querySelector("#roles table");const w=t?t.parentElement:null;
document.title=JSON.stringify({panel_overflow:Math.max(...over),page_overflow:document.documentElement.scrollWidth-innerWidth,
rows:t?t.rows.length:0,cols:t?t.rows[0].cells.length:0,box_height:w?w.clientHeight:0,box_scroll:w?w.scrollHeight:0});})();</script>"""


def test_roles_of_48_layers_stay_inside_their_card(tmp_path, capsys):
    """Issue 15: with 30+ layers the roles-per-layer table overflowed its card. A 48-layer model
    (GPT-2 XL's depth): in headless Chromium at 1280 px no panel and not the page scrolls
    sideways, the table has a row per layer, scrolled inside a box of bounded height; the
    markdown has a row per layer too. A screenshot is kept in tests/artifacts/."""
    from transformers import GPT2Config, GPT2LMHeadModel

    browser = _chromium()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=48, n_embd=16, n_head=2, n_inner=32, vocab_size=len(WORDS),
                                       n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
    mdir = tmp_path / "model"
    model.save_pretrained(str(mdir), safe_serialization=True)
    _tokenizer().save_pretrained(str(mdir))
    store = tmp_path / "store"
    assert run(capsys, "scan", mdir, "--store", store, "--kurtosis", "2.5", "--json")[0] == 0
    out = tmp_path / "r.html"
    assert run(capsys, "report", mdir, "--store", store, "--out", out)[0] == 0
    rep = _payload(out.read_text())
    per_layer = rep["summary"]["roles_per_layer"]
    assert sum(any(c) for c in per_layer.values()) >= 2 and all(len(c) == 48 for c in per_layer.values())
    probe = tmp_path / "probe.html"
    probe.write_text(out.read_text().replace("</body>", MEASURE + "</body>"))
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1400"]
    dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = json.loads(re.search(r"<title>(.*?)</title>", dom.stdout, re.S).group(1).replace("&quot;", '"'))
    assert m["panel_overflow"] <= 1 and m["page_overflow"] <= 1, m
    assert m["rows"] == 49 and m["cols"] == 2 + sum(any(c) for c in per_layer.values()), m
    assert m["box_height"] <= 300 < m["box_scroll"], m  # 48 rows scroll inside the card
    md = tmp_path / "r.md"
    assert run(capsys, "report", mdir, "--store", store, "--out", md, "--format", "md")[0] == 0
    assert sum(1 for line in md.read_text().splitlines() if re.match(r"\| L\d+ \|", line)) == 48
    art = Path(__file__).parent / "artifacts"
    art.mkdir(exist_ok=True)
    shot = art / "report_48_layers.png"
    res = subprocess.run([browser, *flags, f"--screenshot={shot}", out.as_uri()], capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0 and shot.stat().st_size > 10_000, res.stderr[-2000:]
