"""Print the demonstration's table: each metric for base and every variant, with lm-eval's stderr."""

import json
import sys
from pathlib import Path

METRICS = [("forgetting_knowledge", "acc"), ("forgetting_ifeval", "prompt_level_strict_acc"),
           ("forgetting_ifeval", "inst_level_strict_acc"), ("forgetting_target", "exact_match"),
           ("forgetting_prose", "bits_per_byte"), ("forgetting_format_health", "leak_rate"),
           ("forgetting_format_health", "response_words")]

root = Path(sys.argv[1])
names = [n for n in ("base", "aggressive", "lora", "replay")
         if all((root / n / part).is_file() for part in ("eval_full.json", "eval_gen.json"))]
results = {}
for name in names:
    merged = {}
    for part in ("eval_full.json", "eval_gen.json"):
        merged.update(json.loads((root / name / part).read_text())["results"])
    results[name] = merged
print("| task | metric | " + " | ".join(names) + " |")
print("|---|---|" + "---|" * len(names))
for task, metric in METRICS:
    cells = []
    for name in names:
        row = results[name].get(task, {})
        value, stderr = row.get(f"{metric},none"), row.get(f"{metric}_stderr,none")
        cells.append("" if value is None else f"{value:.3f}" + (f" ± {stderr:.3f}" if isinstance(stderr, float) else ""))
    print(f"| {task} | {metric} | " + " | ".join(cells) + " |")
