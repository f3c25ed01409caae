"""`discover serve`: a real server process (uvicorn) over a real store, driven over HTTP and in
headless Chromium (selenium with Debian's chromium-driver; tests/setup_system.sh installs it).

The store holds the embedded default model (scan, a short corpus pass, a short verify run) and a
hostile model: a tiny GPT-2 in a directory whose name is markup, with token strings that are
script, and a corpus pass over text made of them. Nothing of it may run in the browser."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

HOSTILE = ["<script>window.__pwned=1</script>", "<img src=x onerror=window.__pwned=2>", "\"'><b>x</b>",
           "</textarea><svg/onload=window.__pwned=3>", "&amp;&lt;", "{{7*7}}"]
WORDS = ["<|endoftext|>", "the", "a", "of", "and", "to", "is", "in", "it", "that"] + HOSTILE
HOSTILE_DIR = "evil<img src=x onerror=window.__pwned=4>"


def hostile_model(root: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    d = root / HOSTILE_DIR
    d.mkdir(parents=True)
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=len(WORDS), n_positions=64,
                               bos_token_id=0, eos_token_id=0)).eval().save_pretrained(str(d), safe_serialization=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(str(d))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int, *extra: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "discover", "serve", "--store", str(store), "--port", str(port),
                          "--device", "cpu", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()  # printed once the server listens
    if "http://" not in line:
        p.kill()
        raise AssertionError(f"server did not start: {line!r} {p.stderr.read()[-2000:]}")
    return p


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from discover.activations import ActivationConfig
    from discover.cli import main
    from discover.pipeline import run_pipeline
    from discover.store import Store
    from discover.verify import VerifyConfig

    d = tmp_path_factory.mktemp("serve")
    store = d / "store"
    with Store(store) as st:
        run_pipeline(None, st, act_config=ActivationConfig(tokens=3000), out=None, progress=False,
                     verify_config=VerifyConfig(tokens=2000, candidates=2, controls=3, per_rule=1))
    mdir = hostile_model(d)
    corpus = d / "hostile.txt"
    corpus.write_text(("the " + " a ".join(HOSTILE) + " of it\n") * 60, encoding="utf-8")
    assert main(["scan", str(mdir), "--store", str(store)]) == 0
    assert main(["activations", str(mdir), "--corpus", str(corpus), "--tokens", "1500", "--store", str(store)]) == 0
    port = free_port()
    proc = start_server(store, port)
    with Store(store, read_only=True) as st:
        ids = {c["config"].get("n_embd") == 32: c["checkpoint_id"][:12] for c in st.checkpoints()}
    yield {"url": f"http://127.0.0.1:{port}", "store": store, "default": ids[False], "hostile": ids[True],
           "model_dir": mdir, "corpus": corpus, "proc": proc, "root": d}
    proc.terminate()
    proc.wait(10)


def get(url: str, timeout: float = 30):
    """(status, parsed JSON or text)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body, status, ctype = r.read().decode(), r.status, r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        body, status, ctype = e.read().decode(), e.code, e.headers.get("content-type", "")
    return status, (json.loads(body) if "json" in ctype else body)


# ------------------------------------------------------------------------------ API
def test_token_api_searches_every_model_both_signs(site):
    from discover.query import query_token
    from discover.store import Store

    status, res = get(f"{site['url']}/api/token?text=%20the&top=5")
    assert status == 200
    by_id = {m["id"]: m for m in res["models"]}
    assert {site["default"], site["hostile"]} <= set(by_id)
    m = by_id[site["default"]]
    with Store(site["store"], read_only=True) as st:
        want = query_token(st, site["default"], " the", top=5)
        neg = query_token(st, site["default"], " the", top=5, negative=True)
    assert [r["neuron"] for r in m["positive"]] == [r["neuron"] for r in want["results"]]
    assert [r["congruence"] for r in m["negative"]] == [r["congruence"] for r in neg["results"]]
    assert all(a["congruence"] >= b["congruence"] for a, b in zip(m["positive"], m["positive"][1:]))
    assert by_id[site["hostile"]]["token"] == "the"  # its word-level tokenizer drops the space


def test_neuron_api_and_openapi(site):
    status, res = get(f"{site['url']}/api/neuron/{site['default']}/L1.N5?examples=3")
    assert status == 200 and res["neuron"] == "L1.N5" and len(res["activity"]["examples"]) == 3
    assert res["top_tokens"] and res["similar"] and "verdicts" in res
    status, schema = get(f"{site['url']}/openapi.json")
    assert status == 200 and {"/api/token", "/api/neuron/{model}/{neuron}", "/api/roles", "/api/verdicts",
                              "/api/probe"} <= set(schema["paths"])
    assert all(set(ops) == {"get"} for ops in schema["paths"].values())  # no endpoint writes
    assert not any("sql" in p for p in schema["paths"])


@pytest.mark.parametrize("path, status, needle", [
    ("/api/neuron/{default}/L9.N5", 400, "out of range"),
    ("/api/neuron/{default}/banana", 400, "neuron"),
    ("/api/neuron/0123456789abcdef/L1.N5", 404, "not been scanned"),
    ("/api/token?top=-1&text=a", 422, "top"),
    ("/api/token?token_id=abc", 422, "token_id"),
    ("/api/token", 400, "give the token"),
    ("/api/roles?model={default}&role=wizard", 400, "unknown role"),
    ("/api/verdicts?model={default}&verdict=maybe", 400, "unknown verdict"),
    ("/api/study/nope", 404, "no token study"),
    ("/api/probe?model={default}&text=", 400, "empty"),
    ("/neuron/{default}/L9.N5", 400, "out of range"),
    ("/nowhere", 404, "Not Found"),
])
def test_malformed_requests_get_one_line_4xx(site, path, status, needle):
    got, body = get(site["url"] + path.format(default=site["default"]))
    assert got == status
    text = body["error"] if isinstance(body, dict) else body
    assert needle.lower() in text.lower() and "Traceback" not in text
    if isinstance(body, dict):
        assert "\n" not in body["error"]


def test_no_endpoint_writes(site):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        req = urllib.request.Request(f"{site['url']}/api/token?text=the", method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 405


def test_requests_for_another_host_are_refused(site):
    """DNS rebinding: a page elsewhere whose name resolves to 127.0.0.1 sends its own Host header."""
    req = urllib.request.Request(f"{site['url']}/api/models", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400
    assert get(f"{site['url']}/search?q=%23%C2%B2")[0] < 500  # '#²' is not a token id


def test_concurrent_probes_equal_one_at_a_time(site):
    texts = ["def f(x):\n    return x", "import os\nprint(os.getcwd())\n# a longer comment here"]
    url = f"{site['url']}/api/probe?model={site['default']}&neuron=L0.N3&text="
    want = {t: get(url + urllib.request.quote(t))[1] for t in texts}
    got, errors = [], []

    def client(i):
        for j in range(5):
            t = texts[(i + j) % 2]
            status, body = get(url + urllib.request.quote(t))
            (got if status == 200 else errors).append((t, body))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors and len(got) == 20
    assert all(body == want[t] for t, body in got)


def test_snapshot_keeps_a_copy_while_a_request_reads_it(site, tmp_path):
    """Refreshes while a request holds its handle: the handle keeps working; afterwards only the
    newest copy is left on disk."""
    from discover.serve.catalog import Snapshot
    from discover.store import Store

    root = tmp_path / "store"
    shutil.copytree(site["store"], root)
    snap = Snapshot(root, refresh_s=0.0)
    try:
        with snap.store() as held:
            for i in range(3):
                with Store(root) as w:
                    w.add_alias(f"alias-{i}", w.checkpoints()[0]["checkpoint_id"])
                assert snap.refresh(force=True)
            assert held.con.execute("SELECT count(*) FROM checkpoints").fetchone()[0] >= 2
        with snap.store() as st:
            assert st.con.execute("SELECT count(*) FROM models WHERE spec LIKE 'alias-%'").fetchone()[0] == 3
        assert len(list(snap.dir.glob("catalog-*.duckdb"))) == 1
    finally:
        snap.close()


def test_an_older_catalog_without_the_newer_tables(site, tmp_path):
    from discover.store import Store

    root = tmp_path / "store"
    shutil.copytree(site["store"], root)
    with Store(root) as st:
        for t in ("patch_results", "patch_experiments", "watch_checkpoints", "study_neurons", "study_runs"):
            st.con.execute(f"DROP TABLE IF EXISTS {t}")
    port = free_port()
    p = start_server(root, port)
    try:
        for path in (f"/api/neuron/{site['default']}/L1.N5", f"/neuron/{site['default']}/L1.N5",
                     f"/api/studies/{site['default']}", "/api/study/xyz"):
            status, _ = get(f"http://127.0.0.1:{port}{path}")
            assert status in (200, 404), path
    finally:
        p.terminate()
        p.wait(10)


def test_probe_api_equals_a_traced_forward_pass(site):
    from discover.adapter import load_model
    from discover.defaults import default_model_spec
    from discover.tokens import bos_id

    text = "def f(x):\n    return x + 1"
    status, res = get(f"{site['url']}/api/probe?model={site['default']}&neuron=L1.N5&text="
                      + urllib.request.quote(text) + "&position=2")
    assert status == 200 and res["position"] == 2
    view = load_model(default_model_spec())
    ids = view.tokenizer(text, add_special_tokens=False)["input_ids"]
    tr = view.trace(torch.tensor([[bos_id(view.tokenizer)] + ids]))
    want = tr.acts[1][0, 1:, 5].numpy()
    assert [t["token_id"] for t in res["tokens"]] == ids
    assert max(abs(a - b) for a, b in zip(res["values"], want.tolist())) < 1e-5
    at2 = torch.stack([tr.acts[l][0, 3] for l in range(view.n_layers)]).flatten()
    assert abs(res["top"][0]["activation"] - float(at2.max())) < 1e-5
    assert abs(res["bottom"][0]["activation"] - float(at2.min())) < 1e-5


def test_load_50_concurrent_clients(site):
    """50 clients at once over loopback, 10 token queries each: every answer 200, in bounded time."""
    lat, errors = [], []
    words = ["%20the", "%20a", "%20of", "%20def", "%20in"]

    def client(i):
        for j in range(10):
            t = time.perf_counter()
            try:
                status, _ = get(f"{site['url']}/api/token?text={words[(i + j) % 5]}&top=10", timeout=60)
                if status != 200:
                    errors.append(status)
            except Exception as e:  # noqa: BLE001 (counted, reported below)
                errors.append(repr(e))
            lat.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wall = time.perf_counter() - t0
    assert not errors and len(lat) == 500
    lat.sort()
    print(f"\n500 token queries by 50 concurrent clients in {wall:.1f} s: p50 {lat[250] * 1000:.0f} ms, "
          f"p99 {lat[495] * 1000:.0f} ms")
    assert wall < 120


# --------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium / chromium-driver not installed: run tests/setup_system.sh (CI does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def assert_inert(drv):
    from selenium.webdriver.common.by import By

    assert drv.execute_script("return window.__pwned === undefined")
    assert not drv.find_elements(By.CSS_SELECTOR, "script, img, iframe, svg[onload]")  # the site's pages have none
    assert not [b for b in drv.find_elements(By.TAG_NAME, "b") if b.text == "x"]  # '"\'><b>x</b>' stayed text


def test_journey_search_results_neuron_probe(site, browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(site["url"] + "/")
    box = browser.find_element(By.ID, "q")
    box.send_keys(" the")
    browser.find_element(By.ID, "go").click()
    # each click loads a page: wait for it (a look right after the click can still see the old one)
    sel = f"table.results.positive a[href*='/neuron/{site['default']}/']"
    first = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, sel))[0]
    name = first.text
    first.click()

    def titled(d):
        try:
            return any(name in h.text for h in d.find_elements(By.TAG_NAME, "h1"))
        except StaleElementReferenceException:  # the page changed under the look
            return False

    WebDriverWait(browser, 30).until(titled)
    assert browser.find_elements(By.CSS_SELECTOR, ".ex span")  # max-activating examples, shaded
    browser.find_element(By.ID, "probe-text").send_keys("for x in range(10):\n    print(x)")
    browser.find_element(By.ID, "probe-go").click()
    WebDriverWait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".probe span, #error"))
    assert not browser.find_elements(By.ID, "error"), browser.find_element(By.ID, "error").text
    spans = browser.find_elements(By.CSS_SELECTOR, ".probe span")
    assert len(spans) > 5 and all(s.get_attribute("title") for s in spans)
    assert browser.find_elements(By.CSS_SELECTOR, "table.probe-top tbody tr")
    Path(__file__).parent.joinpath("artifacts").mkdir(exist_ok=True)
    browser.get(f"{site['url']}/neuron/{site['default']}/{name}")
    browser.save_screenshot(str(Path(__file__).parent / "artifacts" / "serve_neuron.png"))


def test_hostile_text_stays_inert(site, browser):
    from selenium.webdriver.common.by import By

    h = site["hostile"]
    pages = ["/", "/search?q=" + urllib.request.quote(HOSTILE[0]), f"/neuron/{h}/L0.N1", f"/neuron/{h}/L1.N7",
             f"/roles?model={h}&role=prediction", f"/search?q=%23{len(WORDS) - 1}",
             f"/probe?model={h}&neuron=L0.N1&text=" + urllib.request.quote(" ".join(HOSTILE)),
             "/nowhere" + urllib.request.quote("<script>window.__pwned=9</script>")]
    for p in pages:
        browser.get(site["url"] + p)
        assert_inert(browser)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "404" in body
    browser.get(f"{site['url']}/neuron/{h}/L0.N1")
    text = browser.find_element(By.TAG_NAME, "body").text
    assert HOSTILE[0] in text  # shown as text (in the max-activating examples)
    browser.get(site["url"] + "/")
    assert HOSTILE_DIR in browser.find_element(By.TAG_NAME, "body").text  # the model's path, as text
    assert_inert(browser)


# ------------------------------------------------------------------------- concurrency
def test_watch_writes_while_the_server_answers(site, tmp_path):
    """A `discover watch` scanning a new checkpoint into the store while clients query the server:
    every request is answered (from the server's snapshot), and the new model appears once written."""
    from conftest import make_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    run = tmp_path / "run" / "checkpoint-1"
    torch.manual_seed(7)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=97, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).eval().save_pretrained(str(run), safe_serialization=True)
    make_tokenizer().save_pretrained(str(run))
    before = {m["id"] for m in get(site["url"] + "/api/models")[1]}
    w = subprocess.Popen([sys.executable, "-m", "discover", "watch", str(run.parent), "--once", "--tokens", "2000",
                          "--verify-tokens", "1000", "--candidates", "2", "--settle", "0", "--store", str(site["store"])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answered, statuses = 0, []
    while w.poll() is None:
        status, _ = get(f"{site['url']}/api/token?text=%20the&top=3", timeout=30)
        statuses.append(status)
        answered += 1
        time.sleep(0.05)
    out, err = w.communicate()
    assert w.returncode == 0, err[-2000:]
    assert answered >= 3 and set(statuses) == {200}
    deadline = time.time() + 30
    while time.time() < deadline:
        after = {m["id"] for m in get(site["url"] + "/api/models")[1]}
        if after - before:
            break
        time.sleep(0.5)
    assert len(after - before) == 1
    from test_query_fast import CHECK  # the watch verbs of `query` stay torch-free too

    for argv in (["query", "changes", "--model", str(run.parent)],
                 ["query", "neuron", "L0.N1", "--history", "--model", str(run.parent)]):
        out = subprocess.run([sys.executable, "-c", CHECK, json.dumps(argv + ["--store", str(site["store"]), "--json"])],
                             capture_output=True, text=True, timeout=120)
        got = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("MODULES ")][-1][8:])
        assert got == {"rc": 0, "heavy": []}, out.stderr[-2000:]


def test_serve_refuses_a_busy_port_and_warns_on_other_hosts(site):
    from discover.cli import main

    port = int(site["url"].rsplit(":", 1)[1])
    out = subprocess.run([sys.executable, "-m", "discover", "serve", "--store", str(site["store"]), "--port", str(port)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "cannot listen" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert main(["serve", "--store", str(site["root"] / "nothing-here"), "--port", str(free_port())]) != 0
    p = start_server(site["store"], free_port(), "--host", "0.0.0.0")
    try:
        time.sleep(0.5)
    finally:
        p.terminate()
        _, err = p.communicate(timeout=10)
    assert "warning" in err and "0.0.0.0" in err
    assert p.returncode == 0  # SIGTERM is a normal stop
    assert not list(Path(tempfile.gettempdir()).glob(f"discover-serve-{p.pid}-*"))  # its snapshot is gone


def test_a_killed_servers_snapshot_is_removed_by_the_next(site):
    p = start_server(site["store"], free_port())
    p.kill()
    p.wait(10)
    assert list(Path(tempfile.gettempdir()).glob(f"discover-serve-{p.pid}-*"))
    q = start_server(site["store"], free_port())
    q.terminate()
    q.wait(10)
    assert not list(Path(tempfile.gettempdir()).glob(f"discover-serve-{p.pid}-*"))
