"""Copy a training run's last checkpoint into discover/default_model and write its model card.

    python tools/make_model_card.py runs/d384 [--wall-note "..."]

Scans the copied model into a scratch store and pastes what `discover sql` / `discover query`
print into the card, so the card shows the scanner's real output.
"""
import glob, json, os, shutil, subprocess, sys, time, platform
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
run = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "runs/default"))
run_name = os.path.relpath(run, ROOT)
ckpt = sorted(glob.glob(f"{run}/checkpoint-*"), key=lambda p: int(p.rsplit("-", 1)[1]))[-1]
dst = os.path.join(ROOT, "discover/default_model")
shutil.rmtree(dst, ignore_errors=True); os.makedirs(dst)
for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
    if os.path.exists(f"{ckpt}/{f}"):
        shutil.copy(f"{ckpt}/{f}", dst)
state = json.load(open(f"{ckpt}/trainer_state.json"))
cfg = json.load(open(f"{run}/run.json"))
logs = [json.loads(l) for l in open(f"{run}/log.jsonl")]
evals = [l for l in logs if "eval_loss" in l]
unigram = evals[0]["unigram_loss"]
start = os.path.getmtime(f"{run}/run.json"); end = os.path.getmtime(f"{ckpt}/trainer_state.json")
size = os.path.getsize(f"{dst}/model.safetensors")
scratch = os.path.join("/tmp", "discover_card_store")
env = dict(os.environ, DISCOVER_STORE=scratch)
shutil.rmtree(scratch, ignore_errors=True)
def sh(*a):
    return subprocess.run(["discover", *a], env=env, capture_output=True, text=True, cwd="/tmp").stdout
sh("scan", dst)
roles = sh("sql", "SELECT role, count(*) AS neurons FROM roles GROUP BY role ORDER BY role")
dist = sh("sql", "SELECT layer, round(max(vocab_kurt), 2) AS max_kurtosis, round(quantile_cont(vocab_kurt, 0.99), 2) AS p99_kurtosis, round(avg(vocab_kurt), 2) AS mean_kurtosis FROM neurons GROUP BY layer ORDER BY layer")
topk = sh("sql", "SELECT n.layer, n.neuron, round(n.vocab_kurt, 2) AS kurtosis, round(n.vocab_skew, 2) AS skew, string_agg(t.token, ' | ' ORDER BY t.rank) AS top_tokens FROM neurons n JOIN neuron_tokens t USING (checkpoint_id, layer, neuron) WHERE t.side = 'top' AND t.rank < 6 GROUP BY ALL ORDER BY kurtosis DESC LIMIT 8")
pred = sh("query", "roles", "--role", "prediction", "--top", "10")
part = sh("query", "roles", "--role", "partition", "--top", "5")
tok = sh("query", "token", " import", "--top", "5")
c = cfg["config"]
n_pred = int(sh("sql", "SELECT count(*) FROM roles WHERE role = 'prediction'", "--json").split(":")[1].split("}")[0])
max_k = float(sh("sql", "SELECT max(vocab_kurt) AS m FROM neurons", "--json").split(":")[1].split("}")[0])
if n_pred:
    limits = (f"## Prediction neurons\n\n{n_pred} neurons pass the prediction test (vocabulary kurtosis > 10, skew > 0); "
              "the strongest are listed above with their top tokens.")
else:
    limits = (f"## Limits, honestly\n\nThe issue asks for prediction neurons with vocabulary kurtosis > 10. This "
              f"model has none: its largest vocabulary kurtosis is {max_k:.2f}. It has real structure (held-out loss "
              "far below the unigram baseline; neurons whose top tokens are digit, letter, indentation and keyword "
              "classes) but not the sparse single-token output directions of GPT-2's late layers.")
wall_note = sys.argv[2] if len(sys.argv) > 2 else "on 2 CPU cores shared with test and benchmark runs"
cmd = (f"discover train {run_name} --layers {c['n_layer']} --d-model {c['d_model']} --heads {c['n_head']} "
       f"--d-mlp {c['d_mlp']} --vocab-size {c['vocab_size']} --context {c['context']} --seed {c['seed']} "
       f"--tokens {c['tokens']} --batch-size {c['batch_size']} --lr {c['lr']} --save-every {c['save_every']} "
       f"--eval-every {c['eval_every']} --keep-checkpoints {c['keep_checkpoints']}")
curve = "\n".join(f"| {e['step']} | {e['tokens']:,} | {e['eval_loss']:.3f} |" for e in evals)
card = f"""# The embedded default model

A GPT-2-architecture model (`GPT2LMHeadModel`, `gelu_new`, tied embeddings) trained from scratch
by this project with `discover train` on the built-in default corpus (the CPython 3.11.7
standard library's sources and `pydoc_data` topics; fingerprint `{cfg['corpus_fingerprint'][:16]}`).
Every command that takes a model uses it when none is given.

| | |
| --- | --- |
| shape | {c['n_layer']} layers, d_model {c['d_model']}, {c['n_head']} heads, {c['d_mlp']} MLP neurons per layer, context {c['context']}, byte-level BPE vocabulary {c['vocab_size']} |
| weights | `model.safetensors`, float32, {size / 2**20:.1f} MB |
| command | `{cmd}` |
| shipped checkpoint | `{os.path.basename(ckpt)}` (step {state['global_step']} of {state['max_steps']}) |
| tokens seen | {state['tokens_seen']:,} |
| held-out loss | **{evals[-1]['eval_loss']:.3f}** nats/token on the held-out split (115,342 tokens; 65,536 evaluated) |
| unigram baseline | {unigram:.3f} nats/token (train-split unigram, add-one smoothing) |
| wall time | {(end - start) / 60:.0f} min, {wall_note} |
| machine | 2 CPU cores (x86-64), 24 GiB, no GPU; torch 2.13.0+cpu, Python {platform.python_version()} |

Held-out loss during training:

| step | tokens | held-out loss |
| --- | --- | --- |
{curve}

## What the scanner finds

`discover scan` (no arguments) then `discover sql`:

```
{roles.strip()}
```

```
{dist.strip()}
```

The most kurtotic neurons and their top tokens:

```
{topk.strip()}
```

`discover query roles --role prediction --top 10`:

```
{pred.strip()}
```

`discover query roles --role partition --top 5`:

```
{part.strip()}
```

`discover query token " import" --top 5`:

```
{tok.strip()}
```

{limits}
"""
open(f"{dst}/README.md", "w").write(card)
print(card)
