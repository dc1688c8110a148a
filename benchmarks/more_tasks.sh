#!/bin/bash
# The README's "More tasks" table: every method but datamodel on each task at its
# default scale (canaries: all), then the leaderboard. About 80 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
H=${HARNESS:-.venv/bin/harness}
M=random,bm25,tfidf,ngram,repsim,grad_dot,grad_cos,tracin,trak,ekfac,logra,datainf,experts
FAST="--no-lds --no-reliability"
$H run --method $M --task facts $FAST
$H run --method $M --task facts --task-param paraphrase=true $FAST
$H run --method all --task canaries $FAST
$H run --method $M --task backdoor $FAST
$H run --method $M --task owners $FAST --no-owner-retrains

# custom: the facts task exported, and a randomly initialised GPT-NeoX fine-tuned on it
FILES=results/custom-example
$H export --task facts --out $FILES
.venv/bin/python - "$FILES" <<'PY'
import json, sys
from pathlib import Path
from harness.pretrained import save_word_level_model
files = Path(sys.argv[1])
texts = []
for name in ("corpus.jsonl", "queries.jsonl", "heldout.jsonl"):
    for row in map(json.loads, (files / name).read_text().splitlines()):
        texts += [row.get(k, "") for k in ("text", "prompt", "target")] + row.get("candidates", [])
save_word_level_model(texts, files / "neox", width=128, depth=2, heads=4, context=128)
PY
$H run --method $M --task custom --task-param corpus=$FILES/corpus.jsonl \
    --task-param queries=$FILES/queries.jsonl --task-param heldout=$FILES/heldout.jsonl \
    --task-param model=$FILES/neox $FAST
$H leaderboard
