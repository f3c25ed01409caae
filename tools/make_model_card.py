"""Copy a training run's last checkpoint into discover/default_model and write its model card.

    python tools/make_model_card.py RUN_DIR ["wall-time note"] [RUN_STORE [NOTES.md]]

Scans the copied model into a scratch store and pastes what `discover sql` / `discover query`
print into the card, so the card shows the scanner's real output. RUN_STORE: a store where
`discover run` (no arguments) ran on the copied model; its verdicts on the prediction and
suppression candidates and the strongest prediction neuron's max-activating examples go into the
card too. NOTES.md: hand-written reading of that evidence, appended as its own section.
"""
import glob, json, os, shutil, subprocess, sys, platform
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
run = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "runs/default"))
run_name = os.path.relpath(run, ROOT)
ckpts = sorted(glob.glob(f"{run}/checkpoint-*"), key=lambda p: int(p.rsplit("-", 1)[1]))
ckpt = ckpts[-1]
dst = os.path.join(ROOT, "discover/default_model")
shutil.rmtree(dst, ignore_errors=True); os.makedirs(dst)
for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
    if os.path.exists(f"{ckpt}/{f}"):
        shutil.copy(f"{ckpt}/{f}", dst)
state = json.load(open(f"{ckpt}/trainer_state.json"))
cfg = json.load(open(f"{run}/run.json"))
logs = [json.loads(l) for l in open(f"{run}/log.jsonl")]
# a resumed run logs the steps after its last checkpoint again: keep each step's last entry
evals = sorted({l["step"]: l for l in logs if "eval_loss" in l}.values(), key=lambda l: l["step"])
trains = sorted({l["step"]: l for l in logs if "tokens_per_s" in l}.values(), key=lambda l: l["step"])
data = json.load(open(f"{run}/data/data.json"))
# compute time: every logged interval's tokens over its measured rate (sessions may have paused it)
train_s = sum((b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in zip([{"tokens": 0}] + trains, trains)
              if b["tokens_per_s"] > 0)
unigram = evals[0]["unigram_loss"]
size = os.path.getsize(f"{dst}/model.safetensors")
scratch = os.path.join("/tmp", "discover_card_store")
shutil.rmtree(scratch, ignore_errors=True)
def discover(store, *a):
    """What `discover ARGS` prints, run against `store`."""
    env = dict(os.environ, DISCOVER_STORE=os.path.abspath(store))
    return subprocess.run(["discover", *a], env=env, capture_output=True, text=True, cwd="/tmp").stdout
def sh(*a):
    return discover(scratch, *a)
sh("scan", dst)
roles = sh("sql", "SELECT role, count(*) AS neurons FROM roles GROUP BY role ORDER BY role")
dist = sh("sql", "SELECT layer, round(max(vocab_kurt), 2) AS max_kurtosis, round(quantile_cont(vocab_kurt, 0.99), 2) AS p99_kurtosis, round(avg(vocab_kurt), 2) AS mean_kurtosis FROM neurons GROUP BY layer ORDER BY layer")
topk = sh("sql", "SELECT n.layer, n.neuron, round(n.vocab_kurt, 2) AS kurtosis, round(n.vocab_skew, 2) AS skew, CASE WHEN n.vocab_skew > 0 THEN 'top' ELSE 'bottom' END AS tail, string_agg(t.token, ' | ' ORDER BY t.rank) AS tail_tokens FROM neurons n JOIN neuron_tokens t USING (checkpoint_id, layer, neuron) WHERE t.side = CASE WHEN n.vocab_skew > 0 THEN 'top' ELSE 'bottom' END AND t.rank < 6 GROUP BY ALL ORDER BY kurtosis DESC LIMIT 8")
below = sh("sql", "SELECT n.layer, n.neuron, round(n.vocab_kurt, 2) AS kurtosis, round(n.vocab_skew, 2) AS skew, string_agg(t.token, ' | ' ORDER BY t.rank) AS top_tokens FROM neurons n JOIN neuron_tokens t USING (checkpoint_id, layer, neuron) WHERE t.side = 'top' AND t.rank < 6 AND n.vocab_kurt BETWEEN 5.5 AND 10 AND n.vocab_skew > 0.5 GROUP BY ALL ORDER BY kurtosis DESC LIMIT 16")
pred = sh("query", "roles", "--role", "prediction", "--top", "10")
part = sh("query", "roles", "--role", "partition", "--top", "5")
supp = sh("query", "roles", "--role", "suppression", "--top", "5")
# the largest vocabulary kurtosis along the run: every checkpoint the run kept, scanned the same way
n_layer = cfg["config"]["n_layer"]
along = ["| step | tokens | " + " | ".join(f"max kurtosis L{i}" for i in range(n_layer)) + " | neurons > 10 |",
         "| --- | --- | " + " | ".join("---" for _ in range(n_layer)) + " | --- |"]
for ck in ckpts:
    shutil.rmtree(scratch + "-along", ignore_errors=True)
    discover(scratch + "-along", "scan", ck)
    rows = json.loads(discover(scratch + "-along", "sql", "SELECT layer, max(vocab_kurt) AS m, count(*) FILTER (WHERE vocab_kurt > 10) AS n FROM neurons GROUP BY layer ORDER BY layer", "--json"))
    st = json.load(open(f"{ck}/trainer_state.json"))
    along.append(f"| {st['global_step']} | {st['tokens_seen']:,} | " + " | ".join(f"{r['m']:.2f}" for r in rows)
                 + f" | {sum(r['n'] for r in rows)} |")
shutil.rmtree(scratch + "-along", ignore_errors=True)
along = "\n".join(along)
tok = sh("query", "token", " import", "--top", "5")
c = cfg["config"]
corpus_desc = {
    "default": "the built-in default corpus (the CPython 3.11.7 standard library's sources and `pydoc_data` topics)",
    "default+docs": ("`--corpus default+docs`: the built-in default corpus (the CPython 3.11.7 standard library's "
                     "sources and `pydoc_data` topics) plus English prose from the Python 3.11 documentation's reST "
                     "sources and the `fortunes` collections (Debian packages; to retrain: `apt-get install "
                     "python3.11-doc fortunes`)"),
}.get(c["corpus"], f"`--corpus {c['corpus']}`")
n_pred = int(sh("sql", "SELECT count(*) FROM roles WHERE role = 'prediction'", "--json").split(":")[1].split("}")[0])
max_k = float(sh("sql", "SELECT max(vocab_kurt) AS m FROM neurons", "--json").split(":")[1].split("}")[0])
if n_pred:
    limits = f"""## Kurtosis along the run

The checkpoints the run kept, scanned the same way:

{along}

{n_pred} neurons pass the prediction test (vocabulary kurtosis > 10, skew > 0). The strongest
positive-skew neurons below the threshold (kurtosis 5.5-10, skew > 0.5):

```
{below.strip()}
```"""
else:
    limits = (f"## Limits, honestly\n\nThe issue asks for prediction neurons with vocabulary kurtosis > 10. This "
              f"model has none: its largest vocabulary kurtosis is {max_k:.2f}. It has real structure (held-out loss "
              "far below the unigram baseline; neurons whose top tokens are digit, letter, indentation and keyword "
              "classes) but not the sparse single-token output directions of GPT-2's late layers.")
wall_note = sys.argv[2] if len(sys.argv) > 2 else "on 2 CPU cores shared with test and benchmark runs"
cmd = (f"discover train {run_name} --corpus {c['corpus']} --layers {c['n_layer']} --d-model {c['d_model']} --heads {c['n_head']} "
       f"--d-mlp {c['d_mlp']} --vocab-size {c['vocab_size']} --context {c['context']} --seed {c['seed']} "
       f"--tokens {c['tokens']} --batch-size {c['batch_size']} --lr {c['lr']} --save-every {c['save_every']} "
       f"--eval-every {c['eval_every']} --keep-checkpoints {c['keep_checkpoints']}")
curve = "\n".join(f"| {e['step']} | {e['tokens']:,} | {e['eval_loss']:.3f} |" for e in evals)
card = f"""# The embedded default model

A GPT-2-architecture model (`GPT2LMHeadModel`, `gelu_new`, tied embeddings) trained from scratch
by this project with `discover train` on {corpus_desc}; corpus fingerprint
`{cfg['corpus_fingerprint'][:16]}`, {data['train_tokens']:,} train and {data['heldout_tokens']:,} held-out tokens.
Every command that takes a model uses it when none is given.

| | |
| --- | --- |
| shape | {c['n_layer']} layers, d_model {c['d_model']}, {c['n_head']} heads, {c['d_mlp']} MLP neurons per layer, context {c['context']}, byte-level BPE vocabulary {c['vocab_size']} |
| weights | `model.safetensors`, float32, {size / 2**20:.1f} MB |
| command | `{cmd}` |
| shipped checkpoint | `{os.path.basename(ckpt)}` (step {state['global_step']} of {state['max_steps']}) |
| tokens seen | {state['tokens_seen']:,} ({state['tokens_seen'] / data['train_tokens']:.1f} epochs of the train split) |
| held-out loss | **{evals[-1]['eval_loss']:.3f}** nats/token on the held-out split ({data['heldout_tokens']:,} tokens; {c['eval_tokens']:,} evaluated) |
| unigram baseline | {unigram:.3f} nats/token (train-split unigram, add-one smoothing) |
| training time | {train_s / 60:.0f} min of training steps, {wall_note} |
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

The most kurtotic neurons and the tokens of their long tail (top tokens for positive skew, bottom
tokens for negative skew):

```
{topk.strip()}
```

`discover query roles --role prediction --top 10`:

```
{pred.strip()}
```

`discover query roles --role suppression --top 5`:

```
{supp.strip()}
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
if len(sys.argv) > 3:
    def sr(*a):
        return discover(sys.argv[3], *a)
    top_pred = json.loads(sr("query", "roles", "--role", "prediction", "--top", "1", "--json"))
    top_pred = top_pred[0]["neuron"] if top_pred else None
    card += f"""
## What the verifier says

`discover run` (no arguments: the default corpus's held-out split, documents this model never
trained on), then `discover query verdicts --kind prediction` and `--kind suppression`:

```
{sr("query", "verdicts", "--kind", "prediction").strip()}
```

```
{sr("query", "verdicts", "--kind", "suppression").strip()}
```
"""
    if top_pred:
        card += f"""
`discover query neuron {top_pred} --examples --examples-k 6 --color never`, the corpus-pass part:

```
activations over {sr("query", "neuron", top_pred, "--examples", "--examples-k", "6", "--color", "never").split("activations over", 1)[-1].strip()}
```
"""
    if len(sys.argv) > 4:
        card += "\n" + open(sys.argv[4]).read()
open(f"{dst}/README.md", "w").write(card)
print(card)
