"""The embedded default model ships inside the package and is what model-less commands use."""

from __future__ import annotations

import json

from discover.cli import main
from discover.scan import default_model_dir


def test_default_model_is_shipped_and_small():
    d = default_model_dir()
    assert d is not None, "discover/default_model is missing: see its model card for how it was trained"
    sizes = {p.name: p.stat().st_size for p in d.iterdir()}
    assert sizes["model.safetensors"] <= 25 * 2**20
    assert "tokenizer.json" in sizes and "README.md" in sizes  # the model card


def test_scan_with_no_arguments_scans_the_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISCOVER_STORE", str(tmp_path / "store"))
    assert main(["scan", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "scanned" and summary["spec"] == str(default_model_dir())
    assert (summary["n_layers"], summary["d_mlp"], summary["d_vocab"]) == (2, 2048, 2048)
    # model-less queries use the default too
    assert main(["query", "token", " import", "--top", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokenization"] == [{"id": res["token_id"], "token": " import"}]
    assert len(res["results"]) == 3 and res["results"][0]["congruence"] >= res["results"][2]["congruence"]
    assert main(["query", "neuron", res["results"][0]["neuron"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top_tokens"]
