"""Mitigation costs on the embedded SmolLM2-135M (fp32, CPU): EWC penalty overhead per step, LoRA step vs full
fine-tuning, and Fisher estimation per example vs a plain forward-backward of the same example.

The EWC overhead is measured with plain and EWC steps interleaved round by round, and the penalty's own work
is timed inside the step: step times on this VM drift by +-10% between runs, more than the effect measured.

Each step trains the same 16 built-in-task conversations (one optimizer step = forward + backward + clip +
AdamW). Results are printed and saved to .benchmarks/mitigation_overhead.json; BENCHMARKS.md records them.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from benchmarks.systems import harness_step
from forgetting.harness.batching import collate
from forgetting.harness.loss import summed_response_loss

ROUNDS = 5
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(embedded_batch):
    yield embedded_batch
    out = Path(os.environ.get("BENCH_RESULTS_DIR", ".benchmarks")) / "mitigation_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(TIMES, indent=2))
    print("\n" + "\n".join(f"{k}: {v:.3f}" for k, v in TIMES.items()))


def make_step(model, tokenizer, examples, penalty=None, penalty_grad=None):
    """One packed micro-batch of 16 conversations per step (micro_batch_tokens 4096), as training runs it."""
    return harness_step(model, tokenizer, examples, micro_batch_tokens=4096, penalty=penalty, penalty_grad=penalty_grad)


def timed(benchmark, name, step):
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run: the step ran once)
        TIMES[f"{name}_s_per_step"] = benchmark.stats.stats.median


def test_plain_step(benchmark, setup):
    tokenizer, examples, base = setup
    timed(benchmark, "plain", make_step(copy.deepcopy(base).train(), tokenizer, examples))


def test_ewc_step(setup):
    """Plain and EWC steps interleaved round by round (both models resident), so drift and noise hit both;
    the penalty's own work (`penalty_grad`) is also timed directly inside each EWC step."""
    from forgetting.mitigations.ewc import EWC, EWCConfig

    tokenizer, examples, base = setup
    plain = make_step(copy.deepcopy(base).train(), tokenizer, examples)
    model = copy.deepcopy(base).train()
    ewc = EWC(EWCConfig(strength=1.0))
    ewc.anchor = [p.detach().clone() for p in model.parameters()]
    ewc.fisher = [torch.rand_like(p) for p in model.parameters()]
    penalty_times: list[float] = []

    def timed_penalty_grad(model, ctx):
        started = time.perf_counter()
        ewc.penalty_grad(model, ctx)
        penalty_times.append(time.perf_counter() - started)

    with_ewc = make_step(model, tokenizer, examples, penalty_grad=timed_penalty_grad)
    plain_times, ewc_times = [], []
    for round_ in range(ROUNDS + 1):
        for step, times in ((plain, plain_times), (with_ewc, ewc_times)):
            started = time.perf_counter()
            step()
            if round_:  # the first round warms up
                times.append(time.perf_counter() - started)
    TIMES["plain_interleaved_s_per_step"] = statistics.median(plain_times)
    TIMES["ewc_interleaved_s_per_step"] = statistics.median(ewc_times)
    TIMES["ewc_step_overhead_fraction"] = (
        TIMES["ewc_interleaved_s_per_step"] / TIMES["plain_interleaved_s_per_step"] - 1
    )
    TIMES["ewc_penalty_grad_s"] = statistics.median(penalty_times[1:])
    TIMES["ewc_penalty_grad_fraction"] = TIMES["ewc_penalty_grad_s"] / TIMES["plain_interleaved_s_per_step"]


def test_lora_step(benchmark, setup):
    from forgetting.mitigations.lora import Lora, LoraMitigationConfig

    tokenizer, examples, base = setup
    model = Lora(LoraMitigationConfig()).wrap_model(copy.deepcopy(base), None).train()
    timed(benchmark, "lora", make_step(model, tokenizer, examples))


def test_fisher_cost_per_example(setup):
    from forgetting.mitigations.ewc import estimate_fisher

    tokenizer, examples, base = setup
    model = copy.deepcopy(base)
    few = examples[:8]
    started = time.perf_counter()
    for example in few:  # the reference: one plain forward-backward per example
        batch = collate([example], tokenizer.pad_token_id)
        summed_response_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    TIMES["forward_backward_s_per_example"] = (time.perf_counter() - started) / len(few)
    for estimator in ("empirical", "sampled"):
        started = time.perf_counter()
        estimate_fisher(model, few, tokenizer.pad_token_id, estimator)
        TIMES[f"fisher_{estimator}_s_per_example"] = (time.perf_counter() - started) / len(few)
