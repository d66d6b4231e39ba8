"""Sharded training (train.distributed=fsdp) on 2 CPU processes over gloo equals training on one process.

Each case is trained once by 2 processes launched with torchrun (all cases in one launch) and once in this
process, unsharded: step losses, final weights (or adapter) and the saved Fisher must agree to float tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgetting.evals.runner import EvalSettings, evaluate, load_for_eval, metric_entries
from forgetting.harness.config import ModelConfig
from forgetting.harness.io import cache_root
from forgetting.harness.job import load_job
from forgetting.harness.models import empty_model, load_model
from forgetting.harness.processes import adopt_slurm_tasks
from forgetting.harness.train import train
from tests.test_distributed import free_port

REPLAY = "Plain text about rivers and mountains.\n\nA second paragraph about the sea and ships.\n"
BASE = [
    "model.name_or_path=tiny-random",
    "data.limit=40",
    "train.batch_size=8",
    "train.lr=1e-3",
    "train.max_steps=3",
    "train.progress=false",
    "train.micro_batch_tokens=300",
    "data.eval_split=heldout",
    "data.eval_limit=8",
    # Adam divides by sqrt(v) + eps: where a gradient is float noise (~1e-12: an embedding row no token used, its
    # L2 pull cancelling), the default eps turns the noise of a different summation order into a full lr step
    "train.adam_eps=1e-6",
]
CASES = {
    "naive": "[]",
    "low_lr": "[{name: low_lr, lr: 1e-4}]",
    "ewc_empirical": "[{name: ewc, strength: 100.0, data: {source: sft, size: 4}}]",
    "ewc_sampled": "[{name: ewc, strength: 1.0, estimator: sampled, normalize: max, data: {source: REPLAY}}]",
    "ewc_online": "[{name: ewc, strength: 100.0, fisher_path: PRIOR, online_decay: 0.5, data: {source: sft, size: 2}}]",
    "l2sp": "[{name: l2sp, strength: 1.0}]",
    "kl_to_base": "[{name: kl_to_base, strength: 1.0, data: {source: REPLAY, size: 2}, batch_size: 2}]",
    "lora": "[{name: lora, r: 4, dropout: 0.0, target_modules: [q_proj, v_proj, down_proj]}]",
    "ewc_lora": "[{name: lora, r: 3, dropout: 0.0, target_modules: [q_proj, down_proj]}, "
    "{name: ewc, strength: 1000.0, data: {source: sft, size: 3}}]",
    "freeze": "[{name: freeze, layers: [0, 0], embeddings: true}]",
    "replay": "[{name: replay, ratio: 0.3, data: {source: REPLAY}}]",
}


def overrides(tmp_path: Path, case: str, where: str, *extra: str) -> list[str]:
    spec = CASES[case].replace("REPLAY", str(tmp_path / "replay.txt"))
    spec = spec.replace("PRIOR", str(tmp_path / "prior" / "ewc_empirical" / "ewc_fisher.safetensors"))
    return [*BASE, f"mitigations={spec}", f"output_dir={tmp_path / where / case}", *extra]


def fresh_cache(directory: Path) -> Path:
    """An empty cache (self-rehearsal answers are generated, not read back) that shares the converted models."""
    (directory / "models").parent.mkdir(parents=True, exist_ok=True)
    (directory / "models").symlink_to(cache_root() / "models", target_is_directory=True)
    return directory


def torchrun(tmp_path: Path, jobs: list[list[str]], processes: int = 2, timeout: int = 900):
    path = tmp_path / f"jobs-{free_port()}.json"
    path.write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", FORGETTING_CACHE=str(fresh_cache(tmp_path / f"cache-{free_port()}")))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    command += [f"--master_port={free_port()}", str(Path(__file__).with_name("train_jobs.py")), str(path)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line.get("loss", line.get("heldout_loss")) for line in lines]


def weights(final: Path) -> dict:
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(final / name))


def assert_same_tensors(ours: dict, reference: dict, what: str, atol: float = 1e-6) -> None:
    assert sorted(ours) == sorted(reference), what
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=atol, msg=f"{what}: {name}")


def failure(result: subprocess.CompletedProcess) -> str:
    """The first process's traceback of a failed launch (torchrun's own summary says only which rank failed)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("[rank0]")]
    return "\n".join(lines[-30:]) or result.stderr[-4000:]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, tokenizer):  # the tokenizer fixture converts the embedded model once
    """Every case trained by 2 sharded processes (one launch) and by this process unsharded, each with its own
    empty cache of self-rehearsal answers."""
    tmp_path = tmp_path_factory.mktemp("sharded")
    (tmp_path / "replay.txt").write_text(REPLAY)
    train(load_job(None, overrides(tmp_path, "ewc_empirical", "prior", "train.seed=1")))  # a Fisher to reuse
    jobs = [overrides(tmp_path, case, "fsdp", "train.distributed=fsdp") for case in CASES]
    result = torchrun(tmp_path, jobs)
    assert result.returncode == 0, failure(result)
    ddp = torchrun(tmp_path, [overrides(tmp_path, "naive", "ddp", "train.distributed=ddp")])
    assert ddp.returncode == 0, failure(ddp)
    reference_cache = fresh_cache(tmp_path / "cache-one")
    os.environ["FORGETTING_CACHE"], saved = str(reference_cache), os.environ.get("FORGETTING_CACHE")
    try:
        for case in CASES:
            train(load_job(None, overrides(tmp_path, case, "one")))
    finally:
        os.environ.pop("FORGETTING_CACHE") if saved is None else os.environ.update(FORGETTING_CACHE=saved)
    return tmp_path, result


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_sharded_processes_match_one_process(sharded_runs, case):
    tmp_path, _ = sharded_runs
    sharded, one = tmp_path / "fsdp" / case, tmp_path / "one" / case
    assert losses(sharded) == pytest.approx(losses(one), rel=1e-5)
    assert len(losses(sharded)) == 4  # the held-out loss, then 3 steps
    # 1% of a step (lr 1e-3): Adam's first steps turn a near-zero gradient's last-bit difference into up to that
    assert_same_tensors(weights(sharded / "final"), weights(one / "final"), case, atol=1e-5)
    if case.startswith("ewc"):
        fisher = load_file(str(sharded / "ewc_fisher.safetensors"))
        assert_same_tensors(fisher, load_file(str(one / "ewc_fisher.safetensors")), "fisher")
    summary = json.loads((sharded / "final" / "trainer_state.json").read_text())
    reference = json.loads((one / "final" / "trainer_state.json").read_text())
    for key in ("before", "after"):
        assert summary["heldout_loss"][key] == pytest.approx(reference["heldout_loss"][key], rel=1e-5)
    assert json.dumps(summary["mitigation_reports"]) != "{}" or case == "naive"
    for name, report in reference["mitigation_reports"].items():
        # penalties of the final weights: sums of squared differences of nearly equal weights, where Adam made
        # last-bit gradient differences (the reduce-scatter rounds otherwise) into ~1e-7 weight differences
        for key, value in report.items():
            expected = pytest.approx(value, rel=1e-3, abs=1e-7) if isinstance(value, float) else value
            assert summary["mitigation_reports"][name][key] == expected, (name, key)


@pytest.mark.slow
def test_consolidated_final_scores_as_the_ddp_run(sharded_runs):
    tmp_path, _ = sharded_runs
    settings = EvalSettings(tasks=["forgetting_knowledge", "forgetting_target", "forgetting_prose"], limit=3)
    scores = {}
    for mode in ("fsdp", "ddp"):
        model, tokenizer = load_for_eval(str(tmp_path / mode / "naive" / "final"))
        results = evaluate(model, tokenizer, settings)["results"]
        scores[mode] = {(task, metric): value for task in results for metric, value, _ in metric_entries(results[task])}
    assert len(scores["ddp"]) >= 5
    assert scores["fsdp"] == pytest.approx(scores["ddp"], rel=1e-4)


@pytest.mark.slow
def test_consolidated_final_loads_with_plain_transformers(sharded_runs):
    from transformers import AutoModelForCausalLM

    tmp_path, _ = sharded_runs
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "naive" / "final")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "naive" / "final")
    ids = torch.arange(3, 40).unsqueeze(0)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from the parent ids in /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def bytes_held(tmp_path: Path, processes: int, *extra: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    command += [f"--master_port={free_port()}", str(Path(__file__).with_name("shard_bytes.py"))]
    output = tmp_path / f"bytes{processes}"
    command += [*BASE, f"output_dir={output}", *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, failure(result)
    return [json.loads(path.read_text()) for path in sorted(output.glob("bytes-*.json"))]


@pytest.mark.slow
def test_each_sharded_process_holds_half_the_bytes(tmp_path):
    """Parameters, gradients and AdamW state: each of 2 sharded processes holds half of what one process holds
    (rows split in two; a tensor with an odd number of rows gives one process a row more)."""
    (whole,) = bytes_held(tmp_path, 1, "train.distributed=ddp")
    halves = bytes_held(tmp_path, 2, "train.distributed=fsdp")
    assert len(halves) == 2
    for kind in ("parameters", "gradients", "optimizer"):
        assert sum(h[kind] for h in halves) == whole[kind], kind
        for held in halves:
            assert held[kind] == pytest.approx(whole[kind] / 2, rel=0.01), (kind, held)


@pytest.mark.slow
def test_killed_sharded_run_resumes_bitwise(tmp_path):
    """SIGKILL both processes after the second checkpoint; the rerun resumes from the sharded state and ends with
    the uninterrupted run's weights and step losses, bit for bit."""
    job = [*BASE, "train.max_steps=5", "train.save_every=1", "train.distributed=fsdp", "mitigations=[{name: l2sp}]"]
    reference = torchrun(tmp_path, [[*job, f"output_dir={tmp_path / 'reference'}"]])
    assert reference.returncode == 0, failure(reference)
    crashed = [[*job, f"output_dir={tmp_path / 'crashed'}"]]
    jobs = tmp_path / "crashed.json"
    jobs.write_text(json.dumps(crashed))
    env = dict(os.environ, OMP_NUM_THREADS="1", FORGETTING_CACHE=str(fresh_cache(tmp_path / "cache-crashed")))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    process = subprocess.Popen(
        [*command, str(Path(__file__).with_name("train_jobs.py")), str(jobs)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (tmp_path / "crashed" / "checkpoint-000002").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    for pid in [*descendants(process.pid), process.pid]:  # torchrun starts its workers in sessions of their own
        os.kill(pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "crashed" / "final").exists()
    rerun = torchrun(tmp_path, crashed)
    assert rerun.returncode == 0, failure(rerun)
    assert "resuming from" in rerun.stdout
    assert losses(tmp_path / "crashed") == losses(tmp_path / "reference")
    ours, theirs = weights(tmp_path / "crashed" / "final"), weights(tmp_path / "reference" / "final")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


@pytest.mark.parametrize("name", ["tiny-random", "embedded:smollm2-135m-instruct"])
def test_empty_model_is_the_loaded_architecture_without_weights(name, tokenizer):
    """What the processes other than the main one shard: the same names, shapes and dtypes, on the meta device."""
    config = ModelConfig(name_or_path=name)
    empty, loaded = empty_model(config, vocab_size=len(tokenizer)), load_model(config, vocab_size=len(tokenizer))
    assert all(p.is_meta for p in empty.parameters())
    shapes = {n: (p.shape, p.dtype) for n, p in empty.named_parameters()}
    assert shapes == {n: (p.shape, p.dtype) for n, p in loaded.named_parameters()}
    assert empty.lm_head.weight is empty.get_input_embeddings().weight  # tied as loaded


@pytest.mark.slow
def test_sharded_model_generates_the_unsharded_answers(tmp_path):
    """Self-rehearsal under fsdp: every process generates in step (each token is a collective forward) and gets
    the unsharded model's greedy answers."""
    from tests.sharded_generate import answers

    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    result = subprocess.run(
        [*command, str(Path(__file__).with_name("sharded_generate.py")), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, failure(result)
    printed = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("answers-*.json"))]
    expected = [list(pair) for pair in answers(sharded=False)]
    assert len(printed) == 2 and all(p == expected for p in printed)
    assert all(text for text, _ in expected)  # words, not empty answers


def test_srun_task_variables_become_the_process_group_variables():
    step = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1"}
    env = dict(step, SLURM_JOB_ID="4242")
    assert adopt_slurm_tasks(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "24242",
    }
    assert not adopt_slurm_tasks(dict(step, RANK="0"))  # torchrun inside the allocation set them already
    assert not adopt_slurm_tasks(dict(step, SLURM_STEP_NUM_TASKS="1"))  # one task: no process group


@pytest.mark.slow
def test_processes_started_as_srun_starts_them_train_sharded(sharded_runs, tmp_path):
    """Two processes with only the variables srun gives its tasks (no torchrun) form the process group and train
    what torchrun's two processes trained."""
    runs, _ = sharded_runs
    job = overrides(runs, "naive", "srun", "train.distributed=fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="1")
    env["SLURM_JOB_ID"] = str(free_port())  # the port is derived from the job id
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    tasks = [
        subprocess.Popen(
            [sys.executable, "-m", "forgetting", "train", *job],
            env=dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][1][-3000:]
    assert sum(out.count("trained 3 steps") for out, _ in outputs) == 1  # one process group, one report
    assert losses(runs / "srun" / "naive") == losses(runs / "fsdp" / "naive")
    assert_same_tensors(weights(runs / "srun" / "naive" / "final"), weights(runs / "fsdp" / "naive" / "final"), "srun")


@pytest.mark.slow
def test_deepspeed_is_refused_naming_fsdp(tmp_path):
    for args, env in (
        (["train.distributed=deepspeed"], {}),
        ([], {"ACCELERATE_USE_DEEPSPEED": "true"}),  # what `accelerate launch` sets from a DeepSpeed config
    ):
        result = subprocess.run(
            [sys.executable, "-m", "forgetting", "train", *BASE, *args, f"output_dir={tmp_path / 'run'}"],
            capture_output=True,
            text=True,
            env=dict(os.environ, **env),
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "deepspeed" in lines[0].lower(), result.stderr[-2000:]
        assert "train.distributed=fsdp" in lines[0] or "use fsdp" in lines[0]
        assert not (tmp_path / "run").exists()


def test_final_weights_in_the_save_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(load_job(None, [*BASE, "train.max_steps=1", "train.save_dtype=bfloat16", f"output_dir={tmp_path}"]))
    saved = load_file(str(result.final_dir / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((result.final_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(result.final_dir).dtype == torch.bfloat16
