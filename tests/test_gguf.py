"""GGUF files as models: tiny Llama and GPT-2 models written with GGUFWriter (F32 and Q8_0) load
back equal to their source (exactly for F32, within Q8_0's rounding otherwise); the checkpoint id
is the file's sha256; the catalog records format and quantization; a planted neuron is found
through the CLI, for a file and for a directory holding one; `watch` finds the files of a run;
a truncated file, a file that is not GGUF and an architecture we cannot map each give one line,
a non-zero exit and an unchanged store."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from gguf_files import byte_bpe, write_gguf
from test_cli import assert_one_error_line, run, run_json, snapshot, sql_rows

from discover.adapter import from_model, identify, load_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A planted tiny Llama and a tiny GPT-2, each as F32 and Q8_0 GGUF files."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = byte_bpe()
    V = len(tok)
    # d_model 128: a one-token neuron's vocabulary kurtosis, about 3 + d_model^2 / V, clears 10 at V = 300
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=V,
                                         max_position_embeddings=64, tie_word_embeddings=False)).eval()
    # transformers reads GPT-2's GGUF shapes from n_ctx / 4 * n_embd: a standard-proportioned GPT-2
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, bos_token_id=0,
                                      eos_token_id=0)).eval()
    an = tok.encode(" an", add_special_tokens=False)
    assert len(an) == 1
    view = from_model(llama, tok)
    U = view.processed_unembed().double().numpy()
    u = U[:, an[0]] / np.linalg.norm(U[:, an[0]])
    with torch.no_grad():
        llama.model.layers[1].mlp.down_proj.weight[:, 5] = torch.tensor(3.0 * u, dtype=torch.float32)
    d = tmp_path_factory.mktemp("gguf")
    out = {"tok": tok, "an": an[0], "models": {"llama": llama, "gpt2": gpt2}, "dir": d}
    for name, m in (("llama", llama), ("gpt2", gpt2)):
        for q in ("F32", "Q8_0"):
            (d / f"{name}-{q}").mkdir()
            out[name, q] = write_gguf(m, tok, d / f"{name}-{q}" / "model.gguf", q)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_f32_loads_exactly(files, arch):
    src = files["models"][arch]
    path = files[arch, "F32"]
    spec, ckpt, where = identify(str(path))
    assert ckpt == hashlib.sha256(path.read_bytes()).hexdigest() and where == path
    view = load_model(str(path))
    assert view.source["format"] == "gguf" and view.source["quantization"] == "F32"
    got = view.model.state_dict()
    for k, v in src.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.equal(got[k], v), k
    ids = torch.tensor([files["tok"]("I climbed up the apple tree")["input_ids"]])
    assert view.tokenizer("I climbed up the apple tree", add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(view.model(ids).logits, src(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_q8_0_within_quantization_error(files, arch):
    """Q8_0 stores blocks of 32 values as int8 times one float16 scale d = max |x| / 127: every
    weight is within half a step (d / 2) plus the scale's float16 rounding (127 * d * 2^-11) of
    its source; norms and biases stay F32 (exact)."""
    src = files["models"][arch].state_dict()
    view = load_model(str(files[arch, "Q8_0"]))
    assert view.source["quantization"] == "Q8_0"
    got = view.model.state_dict()
    quantized = 0
    for k, v in src.items():
        if not v.dtype.is_floating_point or k not in got:
            continue
        err = (got[k] - v).abs().max()
        if v.ndim == 2 and v.shape[-1] % 32 == 0 and not torch.equal(got[k], v):
            quantized += 1
            amax = v.abs().max()  # a bound per tensor (each block's, with its own max, is tighter)
            step = amax / 254 + amax / 2048
            assert err <= step, (k, float(err), float(step))
        elif v.ndim == 1:
            assert torch.equal(got[k], v), k
    assert quantized >= 6


def test_scan_a_gguf_file_and_a_directory(files, tmp_path, capsys):
    """The planted prediction neuron is found top-1 through the CLI; the catalog says gguf, F32;
    a directory holding the one .gguf is the same model (same checkpoint id)."""
    path = files["llama", "F32"]
    store = tmp_path / "store"
    rc, out, err = run(capsys, "scan", str(path), "--store", str(store))
    assert rc == 0, err
    res = run_json(capsys, "query", "token", "--token-id", str(files["an"]), "--model", str(path), "--store",
                   str(store), "--top", "3", "--json")
    assert res["results"][0]["neuron"] == "L1.N5" and res["results"][0]["role"] == "prediction"
    rows = sql_rows(store, "SELECT checkpoint_id, architecture, source_format, quantization FROM checkpoints")
    assert rows == [(hashlib.sha256(path.read_bytes()).hexdigest(), "llama", "gguf", "F32")]
    rc, out, err = run(capsys, "scan", str(path.parent), "--store", str(store))
    assert rc == 0, err
    assert len(sql_rows(store, "SELECT * FROM checkpoints")) == 1  # the same checkpoint, not scanned twice


def test_watch_finds_the_gguf_files_of_a_run(files, tmp_path):
    from discover.watch import find_checkpoints

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for step in (200, 100):
        shutil.copy(files["llama", "F32"], run_dir / f"model-step{step}.gguf")
    (run_dir / "notes.txt").write_text("not a checkpoint\n")
    found = find_checkpoints(run_dir)
    assert [(f.path.name, f.step, f.series) for f in found] == [
        ("model-step100.gguf", 100, str(run_dir)), ("model-step200.gguf", 200, str(run_dir))]
    assert identify(str(found[0].path))[1] == identify(str(found[1].path))[1]
    # HF-style layout: run/checkpoint-STEP/model.gguf (step from the directory, run = the one above);
    # hidden and staging files are not checkpoints
    nested = tmp_path / "nested"
    for step in (20, 10):
        (nested / f"checkpoint-{step}").mkdir(parents=True)
        shutil.copy(files["llama", "F32"], nested / f"checkpoint-{step}" / "model-Q8_0.gguf")
    shutil.copy(files["llama", "F32"], nested / "checkpoint-10" / ".partial.gguf")
    found = find_checkpoints(nested)
    assert [(f.path.parent.name, f.step, f.series) for f in found] == [
        ("checkpoint-10", 10, str(nested)), ("checkpoint-20", 20, str(nested))]


def test_the_file_alone_defines_the_model(files, tmp_path):
    """A config.json and tokenizer of another model lying beside the .gguf change nothing; an
    upper-case suffix and a file without one load too (recognised by the GGUF magic)."""
    from conftest import make_model, save

    d = save(make_model("gpt2"), tmp_path / "other")  # 97-token word-level tokenizer, another config
    for p in d.glob("*.safetensors"):
        p.unlink()
    shutil.copy(files["llama", "F32"], d / "model.GGUF")
    want = load_model(str(files["llama", "F32"]))
    for spec in (d / "model.GGUF", d):
        view = load_model(str(spec))
        assert view.architecture == "llama" and view.d_vocab == len(files["tok"]) == want.d_vocab
        assert view.token_strings() == want.token_strings()
    bare = tmp_path / "bare"
    shutil.copy(files["llama", "F32"], bare)
    assert load_model(str(bare)).checkpoint_id == want.checkpoint_id


def _bad_files(files, d):
    src = files["llama", "F32"]
    trunc = d / "truncated.gguf"
    data = src.read_bytes()
    trunc.write_bytes(data[: len(data) * 2 // 3])
    header_cut = d / "header_cut.gguf"
    header_cut.write_bytes(data[:40])
    junk = d / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip file, not GGUF" * 10)
    return trunc, header_cut, junk


def _incomplete(files, d):
    """A tiny Llama's GGUF without one of its tensors (blk.1.ffn_down.weight)."""
    import gguf

    src = files["llama", "F32"]
    r = gguf.GGUFReader(str(src))
    path = d / "incomplete.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(f.name, f.contents())
        else:
            w.add_key_value(f.name, f.contents(), vtype)
    for t in r.tensors:
        if t.name != "blk.1.ffn_down.weight":
            w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed(t.shape.tolist())))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _aligned(files, d, alignment: int):
    """A GGUF file whose header says general.alignment = `alignment` (0 would divide by zero)."""
    import gguf

    path = d / f"aligned{alignment}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("general.alignment", alignment)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.data_alignment = 32  # the writer itself pads as usual; only the header lies
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _other_arch(d, arch: str):
    """A GGUF file of another architecture (a few metadata keys and one tensor)."""
    import gguf

    path = d / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_gguf_files_are_one_line_and_change_nothing(files, tmp_path, capsys):
    store = tmp_path / "store"
    rc, _, err = run(capsys, "scan", str(files["gpt2", "F32"]), "--store", str(store))
    assert rc == 0, err
    before = snapshot(store)
    trunc, header_cut, junk = _bad_files(files, tmp_path)
    cases = [
        (trunc, ["truncated", "truncated.gguf"]),
        (header_cut, ["header_cut.gguf", "corrupt or truncated"]),
        (junk, ["not a GGUF file", "junk.gguf"]),
        (_other_arch(tmp_path, "mamba"), ["'mamba'", "supported"]),  # transformers reads it; we cannot
        (_other_arch(tmp_path, "rwkv6"), ["'rwkv6'", "cannot be mapped"]),  # transformers cannot read it
        # llama.cpp's name for Qwen2-MoE maps to qwen2_moe (a family of ours): this stub has no config
        (_other_arch(tmp_path, "qwen2moe"), ["qwen2moe.gguf", "could not load"]),
        (_other_arch(tmp_path, "phimoe"), ["'phimoe'", "cannot be mapped"]),
        (_incomplete(files, tmp_path), ["incomplete.gguf", "lacks 1", "down_proj"]),
        (_aligned(files, tmp_path, 0), ["alignment", "corrupt"]),
    ]
    for path, needles in cases:
        rc, out, err = run(capsys, "scan", str(path), "--store", str(store))
        assert_one_error_line(rc, err, *needles)
        assert snapshot(store) == before, path.name
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        shutil.copy(files["gpt2", "F32"], two / n)
    rc, out, err = run(capsys, "scan", str(two), "--store", str(store))
    assert_one_error_line(rc, err, "2 .gguf files", "pass one of them")
    assert snapshot(store) == before


def test_every_stage_runs_on_a_gguf_file(files, tmp_path, capsys):
    """`run` (scan -> activations -> verify -> report) and `patch` take a .gguf file as MODEL;
    the report names its quantization."""
    from gguf_files import TEXT

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(TEXT[i * 37:] + TEXT[: i * 37])
    path, store = files["llama", "Q8_0"], tmp_path / "store"
    rc, out, err = run(capsys, "run", str(path), "--corpus", str(corpus), "--tokens", "1500", "--verify-tokens",
                       "1500", "--verify-split", "all", "--candidates", "3", "--store", str(store),
                       "--out", str(tmp_path / "r.html"))
    assert rc == 0, err[-2000:]
    from test_report import _payload

    payload = _payload((tmp_path / "r.html").read_text())
    assert (payload["architecture"], payload["source_format"], payload["quantization"]) == ("llama", "gguf", "Q8_0")
    rows = sql_rows(store, "SELECT count(*) FROM neuron_activations")
    assert rows == [(2 * 128,)]
    res = run_json(capsys, "patch", str(path), "--clean", "I climbed up the apple tree and picked",
                   "--corrupted", "I climbed up the lemon tree and picked", "--target", " an", "--contrast", " a",
                   "--store", str(store), "--json")
    assert res["experiment_id"] and set(res["layers"]) == {"0", "1"}
    assert all(len(v["recovery"]) == 128 for v in res["layers"].values())


def test_watch_and_universality_over_gguf_checkpoints(files, tmp_path, capsys):
    """`watch --once` processes a run of two .gguf checkpoints (scan -> activations -> verify ->
    tracking -> report) and tracks the second against the first; `universality` takes them too."""
    from gguf_files import TEXT
    from transformers import LlamaForCausalLM

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(TEXT[i * 37:] + TEXT[: i * 37])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    src = files["models"]["llama"]
    later = LlamaForCausalLM(src.config).eval()
    later.load_state_dict(src.state_dict())
    with torch.no_grad():  # a training step later: the same neurons, slightly moved
        for p in later.parameters():
            p.add_(0.01 * torch.randn_like(p) * p.std())
    write_gguf(src, files["tok"], run_dir / "model-step100.gguf")
    write_gguf(later, files["tok"], run_dir / "model-step200.gguf")
    store = tmp_path / "store"
    capsys.readouterr()
    rc, out, err = run(capsys, "watch", str(run_dir), "--once", "--tokens", "1500", "--verify-tokens", "1500",
                       "--verify-split", "all", "--corpus", str(corpus), "--candidates", "3", "--settle", "0",
                       "--store", str(store))
    assert rc == 0, err[-2000:]
    assert sql_rows(store, "SELECT step, status FROM watch_checkpoints ORDER BY step") == [(100, "done"), (200, "done")]
    same = sql_rows(store, "SELECT avg((neuron = prev_neuron)::INT) FROM neuron_matches")[0][0]
    assert same > 0.95  # every neuron found again in the next checkpoint
    rc, out, err = run(capsys, "universality", str(run_dir / "model-step100.gguf"), str(run_dir / "model-step200.gguf"),
                       "--corpus", str(corpus), "--tokens", "500", "--store", str(store))
    assert rc == 0, err[-2000:]
