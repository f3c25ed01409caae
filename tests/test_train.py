"""`discover train` on a tiny config: checkpoints load, loss falls, resume is bit-exact."""

import json
import os
import random

import numpy as np
import pytest
import torch

import discover.train as train_mod
from discover.cli import main
from discover.errors import TrainError
from discover.train import TrainConfig, latest_checkpoint, train

STEPS = 40
TINY = dict(
    n_layer=1, d_model=32, n_head=2, d_mlp=64, vocab_size=300, context=32, batch_size=8,
    tokens=8 * 32 * STEPS, lr=3e-3, warmup_steps=5, save_every=10, eval_every=20, eval_tokens=512,
)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def write_corpus(d, n_docs=120, seed=0):
    """Documents from a small grammar: learnable structure, enough documents for a held-out split."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "some bird"]
    verbs = ["sees", "likes", "follows", "finds", "calls"]
    objects = ["the ball", "a tree", "the river", "her house", "the moon"]
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [
            f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(rng.randint(8, 16))
        ]
        (d / f"doc{i:03d}.txt").write_text(" ".join(lines) + "\n")
    return d


def tiny(out, corpus, **kw) -> TrainConfig:
    return TrainConfig(out=str(out), corpus=str(corpus), **{**TINY, **kw})


def weights(ckpt) -> bytes:
    with open(os.path.join(ckpt, "model.safetensors"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    """One uninterrupted tiny run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "full"
    return tiny(out, corpus), train(tiny(out, corpus), progress=False)


def test_run_writes_loadable_checkpoints(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, res = run
    assert res.final_step == STEPS and res.tokens_seen == cfg.tokens
    assert res.checkpoint == os.path.join(cfg.out, f"checkpoint-{STEPS}") == latest_checkpoint(cfg.out)
    assert sorted(n for n in os.listdir(cfg.out) if n.startswith("checkpoint-")) == [
        f"checkpoint-{s}" for s in (10, 20, 30, 40)
    ]
    ckpt = res.checkpoint
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json",
                 "training_args.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert os.path.isfile(os.path.join(ckpt, name)), name
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert model.config.activation_function == "gelu_new" and model.config.n_layer == 1
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert model.config.eos_token_id == tok.eos_token_id
    assert len(tok) == model.config.vocab_size <= 300
    enc = tok("the cat sees the moon.")
    assert tok.decode(enc["input_ids"]) == "the cat sees the moon."
    with torch.no_grad():
        logits = model(torch.tensor([enc["input_ids"]])).logits
    assert logits.shape == (1, len(enc["input_ids"]), model.config.vocab_size)

    data = json.load(open(os.path.join(cfg.out, "data", "data.json")))
    assert os.path.getsize(os.path.join(cfg.out, "data", "train.bin")) == 2 * data["train_tokens"]
    assert data["heldout_tokens"] > 0 and res.unigram_loss == data["unigram_loss"] > 0


def test_loss_decreases_and_is_logged(run):
    cfg, res = run
    state = json.load(open(os.path.join(res.checkpoint, "trainer_state.json")))
    assert state["global_step"] == STEPS and state["tokens_seen"] == cfg.tokens
    train_losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    evals = [h for h in state["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 20, 40]
    assert train_losses[-1] < train_losses[0]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0
    assert res.heldout_loss == evals[-1]["eval_loss"]
    assert state["best_metric"] == min(h["eval_loss"] for h in evals)
    log = [json.loads(line) for line in open(os.path.join(cfg.out, "log.jsonl"))]
    assert [h["eval_loss"] for h in log if "eval_loss" in h] == [h["eval_loss"] for h in evals]


def test_resume_after_kill_is_bit_identical(run, corpus, tmp_path, monkeypatch):
    _, full = run
    out = tmp_path / "killed"

    def kill(step):
        if step == 25:  # after checkpoint-20, before checkpoint-30
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_after_step", kill)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(out, corpus), progress=False)
    assert latest_checkpoint(str(out)).endswith("checkpoint-20")
    monkeypatch.undo()

    res = train(tiny(out, corpus), progress=False)
    assert res.final_step == STEPS
    for step in (30, 40):
        a, b = os.path.join(full.out, f"checkpoint-{step}"), os.path.join(out, f"checkpoint-{step}")
        assert weights(a) == weights(b)
        assert open(os.path.join(a, "trainer_state.json")).read() == open(os.path.join(b, "trainer_state.json")).read()
    assert res.heldout_loss == full.heldout_loss

    # Rerunning a finished run trains nothing and reports the same end point.
    again = train(tiny(out, corpus), progress=False)
    assert again.final_step == STEPS and again.checkpoint == res.checkpoint


def test_same_seed_same_weights_other_seed_differs(run, corpus, tmp_path):
    _, full = run
    short = dict(tokens=8 * 32 * 10, save_every=10)
    a = train(tiny(tmp_path / "a", corpus, **short), progress=False)
    b = train(tiny(tmp_path / "b", corpus, **short), progress=False)
    c = train(tiny(tmp_path / "c", corpus, seed=1, **short), progress=False)
    assert weights(a.checkpoint) == weights(b.checkpoint)
    assert weights(a.checkpoint) != weights(c.checkpoint)
    # Same tokenizer and data files as the long run: they depend on the corpus only.
    for rel in ("tokenizer/tokenizer.json", "data/train.bin", "data/heldout.bin"):
        assert open(os.path.join(a.out, rel), "rb").read() == open(os.path.join(full.out, rel), "rb").read()


def test_mismatched_run_is_refused(run, tmp_path):
    cfg, _ = run
    for change in (dict(d_model=64), dict(seed=3), dict(context=16)):
        with pytest.raises(TrainError) as e:
            train(tiny(cfg.out, cfg.corpus, **change), progress=False)
        msg = str(e.value)
        assert "another --out" in msg and "\n" not in msg and next(iter(change)) in msg
    other = write_corpus(tmp_path / "other", n_docs=60, seed=1)
    with pytest.raises(TrainError, match="corpus"):
        train(tiny(cfg.out, other), progress=False)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "file.txt").write_text("x")
    with pytest.raises(TrainError, match="not a discover training run"):
        train(tiny(stranger, cfg.corpus), progress=False)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="d_model"):
        TrainConfig(out="x", d_model=30, n_head=4)
    with pytest.raises(ValueError, match="tokens"):
        TrainConfig(out="x", tokens=10)
    with pytest.raises(ValueError, match="vocab_size"):
        TrainConfig(out="x", vocab_size=70000)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(out="x", dtype="float16")


def test_cli_train(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", str(out), "--corpus", str(corpus), "--layers", "1", "--d-model", "32", "--heads", "2",
            "--d-mlp", "64", "--vocab-size", "300", "--context", "32", "--batch-size", "8",
            "--tokens", str(8 * 32 * 10), "--save-every", "5", "--eval-every", "5", "--warmup-steps", "2",
            "--lr", "3e-3", "--seed", "0", "--device", "cpu", "--dtype", "float32", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "step 10" in printed and "unigram" in printed and "checkpoint-10" in printed
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-10", "checkpoint-5"]
    assert latest_checkpoint(str(out)).endswith("checkpoint-10")

    # A bad config and a mismatched rerun: one line on stderr, exit 2, no traceback.
    assert main(["train", str(tmp_path / "bad"), "--d-model", "30", "--heads", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d_model" in err and "Traceback" not in err
    assert main(args[:-1] + ["--seed", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another --out" in err

    kept = tmp_path / "kept"
    assert main(["train", str(kept), *args[2:-1], "--keep-checkpoints", "1", "--quiet"]) == 0
    assert sorted(n for n in os.listdir(kept) if n.startswith("checkpoint-")) == ["checkpoint-10"]


def test_cli_train_help_has_example(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "discover train runs/tiny" in out and "--corpus" in out and "--tokens" in out
