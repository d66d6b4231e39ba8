#!/usr/bin/env bash
# The mitigations demonstration (issue 4) until `forgetting run` exists: train the aggressive baseline and two
# mitigated variants on the embedded model, evaluate base and each on the offline suite, print the comparison.
# About 30 minutes on a 2-core CPU. Results: runs/demonstration/<name>/{final, eval_full.json, eval_gen.json}.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=runs/demonstration
evaluate() {  # evaluate MODEL NAME
  forgetting eval "$1" --tasks forgetting_knowledge,forgetting_prose,forgetting_format_health \
    --output "$out/$2/eval_full.json" --overwrite
  forgetting eval "$1" --tasks forgetting_ifeval,forgetting_target --limit 100 \
    --output "$out/$2/eval_gen.json" --overwrite
}
mkdir -p "$out/base"
evaluate embedded:smollm2-135m-instruct base
for name in aggressive lora replay; do
  forgetting train "configs/demonstration/$name.yaml" train.progress=false
  evaluate "$out/$name/final" "$name"
done
python3 configs/demonstration/compare.py "$out"
