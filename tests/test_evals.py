"""Evaluation: the offline suite's task logic (oracle LM), the IFEval checkers offline, the runner and its cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM

from forgetting.evals.runner import EvalSettings, evaluate, headline, task_manager
from forgetting.harness.errors import UserError
from forgetting.harness.models import weights_fingerprint


class OracleLM(LM):
    """Answers every question right (or every one wrong), from the documents themselves."""

    def __init__(self, right: bool = True):
        super().__init__()
        self.right = right

    def loglikelihood(self, requests):
        out = []
        for request in requests:
            doc, (_, continuation) = request.doc, request.args
            correct = continuation.strip() == doc["choices"][doc["answer"]]
            out.append((0.0 if correct == self.right else -10.0, correct == self.right))
        return out

    def loglikelihood_rolling(self, requests):
        return [-0.5 * len(request.args[0]) for request in requests]

    def generate_until(self, requests):
        return [request.doc["response"] if self.right else "I think this is about a person." for request in requests]


def oracle_results(right: bool, limit: int = 20) -> dict:
    from lm_eval import simple_evaluate

    from forgetting.evals.nltk_offline import ensure_punkt_tab

    ensure_punkt_tab()
    settings = EvalSettings(tasks=["forgetting_knowledge", "forgetting_target", "forgetting_prose"], limit=limit)
    return simple_evaluate(
        model=OracleLM(right), tasks=settings.tasks, limit=limit, task_manager=task_manager(settings), bootstrap_iters=0
    )["results"]


def test_oracle_scores_every_task_perfectly_and_a_wrong_lm_scores_zero():
    right, wrong = oracle_results(True), oracle_results(False)
    assert right["forgetting_knowledge"]["acc,none"] == 1.0 and wrong["forgetting_knowledge"]["acc,none"] == 0.0
    assert right["forgetting_target"]["exact_match,none"] == 1.0
    assert (
        wrong["forgetting_target"]["exact_match,none"] == 0.0 and wrong["forgetting_target"]["format_valid,none"] == 0.0
    )
    # rolling loglikelihood of -0.5 nats per byte -> bits per byte = 0.5 / ln 2
    assert right["forgetting_prose"]["bits_per_byte,none"] == pytest.approx(0.5 / 0.6931471805599453, rel=1e-6)


def test_format_health_scores():
    from forgetting.evals.tasks.utils import score_format_health

    clean = score_format_health({}, ["A short answer."])
    assert clean == {"leak_rate": 0.0, "response_words": 3.0, "ends_cleanly": 1.0, "empty_rate": 0.0}
    leaky = score_format_health({}, ["Sure thing ### Response: and then Human: more and cut"])
    assert leaky["leak_rate"] == 1.0 and leaky["ends_cleanly"] == 0.0
    assert score_format_health({}, ["  "])["empty_rate"] == 1.0


def test_suite_data_is_sized_and_balanced():
    from forgetting.evals.ifeval_prompts import prompts
    from forgetting.evals.knowledge import CATEGORIES, items

    knowledge = items()
    assert len(knowledge) >= 300 and {i["category"] for i in knowledge} == set(CATEGORIES)
    assert all(len(i["choices"]) == 4 and len(set(i["choices"])) == 4 for i in knowledge)
    assert knowledge == items()
    records = prompts()
    assert len(records) == 200 and records == prompts()
    assert len({i for r in records for i in r["instruction_id_list"]}) >= 15


SCRIPT = """
import json, sys
from forgetting.evals.tasks.utils import score_ifeval
doc = {"key": 0, "prompt": "p", "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma",
       "length_constraints:number_sentences"], "kwargs": [{}, {}, {"relation": "less than", "num_sentences": 3}]}
print(json.dumps([score_ifeval(doc, [text]) for text in sys.argv[1:]]))
"""


def test_ifeval_checkers_run_offline_with_a_fresh_cache(tmp_path):
    """A new cache directory, no network: the punkt_tab data is built locally and the checkers score."""
    env = dict(os.environ, FORGETTING_CACHE=str(tmp_path), NLTK_DATA=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    texts = ["all lower case. no commas here.", "Has, a comma. And Capitals. Three. Four sentences."]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *texts], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    good, bad = json.loads(result.stdout.strip().splitlines()[-1])
    assert good["prompt_level_strict_acc"] is True and good["inst_level_strict_acc"] == [True, True, True]
    assert bad["prompt_level_strict_acc"] is False and bad["inst_level_strict_acc"] == [False, False, False]
    assert (tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "abbrev_types.txt").is_file()


@pytest.fixture(scope="module")
def tiny_eval_model(tokenizer):
    import copy

    from forgetting.harness.formats import attach_format
    from forgetting.harness.models import tiny_model

    tok = copy.deepcopy(tokenizer)
    attach_format(tok, "chatml")
    return tiny_model(len(tok), seed=1).eval(), tok


def test_tiny_model_runs_the_whole_suite_and_the_cache_is_keyed_by_weights(tiny_eval_model, tmp_path):
    model, tok = tiny_eval_model
    settings = EvalSettings(limit=2, batch_size=2)
    first = evaluate(model, tok, settings, cache_dir=tmp_path)
    assert set(first["results"]) == {
        "forgetting_knowledge",
        "forgetting_ifeval",
        "forgetting_target",
        "forgetting_prose",
        "forgetting_format_health",
    }
    assert first["forgetting"]["cache_hits"] == [] and first["forgetting"]["format"] == "chatml"
    assert all(len(samples) == 2 for samples in first["samples"].values())  # per-example outputs kept
    assert headline(first)
    categories = first["forgetting"]["by_category"]["forgetting_knowledge"]
    assert sum(c["n"] for c in categories.values()) == 2 and all("acc" in c for c in categories.values())

    again = evaluate(model, tok, settings, cache_dir=tmp_path)
    assert (
        sorted(again["forgetting"]["cache_hits"]) == sorted(first["results"]) and again["forgetting"]["evaluated"] == []
    )
    assert again["results"] == first["results"]

    fingerprint = weights_fingerprint(model)
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    try:
        assert weights_fingerprint(model) != fingerprint
        changed = evaluate(
            model, tok, EvalSettings(tasks=["forgetting_knowledge"], limit=2, batch_size=2), cache_dir=tmp_path
        )
        assert changed["forgetting"]["cache_hits"] == [] and changed["forgetting"]["evaluated"] == [
            "forgetting_knowledge"
        ]
    finally:
        with torch.no_grad():
            model.model.norm.weight[0] -= 1e-3
    other_settings = evaluate(
        model, tok, EvalSettings(tasks=["forgetting_knowledge"], limit=3, batch_size=2), cache_dir=tmp_path
    )
    assert other_settings["forgetting"]["cache_hits"] == []


def test_unknown_task_is_a_one_line_error(tiny_eval_model):
    model, tok = tiny_eval_model
    with pytest.raises(UserError, match="tasks: unknown task 'no_such_task'"):
        evaluate(model, tok, EvalSettings(tasks=["no_such_task"]))


@pytest.mark.slow
def test_harness_score_equals_the_lm_eval_cli_on_a_saved_checkpoint(tiny_eval_model, tmp_path):
    from forgetting.evals.runner import TASKS_DIR, load_for_eval

    model, tok = tiny_eval_model
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    tok.save_pretrained(checkpoint)
    tasks = "forgetting_knowledge,forgetting_target"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={checkpoint},dtype=float32",
        "--include_path",
        str(TASKS_DIR),
        "--tasks",
        tasks,
        "--limit",
        "6",
        "--batch_size",
        "3",
        "--device",
        "cpu",
        "--apply_chat_template",
        "--output_path",
        str(tmp_path / "cli"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (cli_file,) = (tmp_path / "cli").rglob("results_*.json")
    cli = json.loads(cli_file.read_text())["results"]

    loaded, loaded_tok = load_for_eval(str(checkpoint))
    ours = evaluate(loaded, loaded_tok, EvalSettings(tasks=tasks.split(","), limit=6, batch_size=3))["results"]
    for task in tasks.split(","):
        for metric, value in cli[task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours[task][metric] == pytest.approx(value, abs=1e-9), (task, metric)


def test_base_plus_peft_adapter_goes_through_the_same_path(tiny_eval_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    from forgetting.evals.runner import load_for_eval

    model, tok = tiny_eval_model
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    peft_model = get_peft_model(tiny_model_copy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)  # a non-trivial adapter
    peft_model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), base_model_name_or_path=str(base_dir))))

    base, base_tok = load_for_eval(str(base_dir))
    adapted, _ = load_for_eval(str(base_dir), adapter=str(adapter_dir))
    assert weights_fingerprint(adapted) != weights_fingerprint(base)
    results = evaluate(adapted, base_tok, EvalSettings(tasks=["forgetting_knowledge"], limit=2, batch_size=2))
    assert "acc,none" in results["results"]["forgetting_knowledge"]
    # an adapter directory alone is evaluated on the base its adapter_config.json names
    alone, _ = load_for_eval(str(adapter_dir))
    assert weights_fingerprint(alone) == weights_fingerprint(adapted)
    with pytest.raises(UserError, match="not a PEFT adapter directory"):
        load_for_eval(str(base_dir), adapter=str(base_dir))


def tiny_model_copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.fixture(scope="module")
def checkout_copy(tmp_path_factory):
    """The offline tasks and the project modules beside them, copied as another checkout would hold them."""
    import shutil

    from forgetting.evals import runner

    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(runner.TASKS_DIR, root / "evals" / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    for package in runner.PROJECT_PACKAGES:
        for path in (runner.PROJECT_ROOT / package).glob("*.py"):
            (root / package).mkdir(exist_ok=True)
            shutil.copy(path, root / package / path.name)
    return root


@pytest.fixture
def key_case(checkout_copy, tiny_eval_model, monkeypatch, tmp_path):
    """(context, key): a copy of the model and tokenizer, the checkout copy and a fresh NLTK data folder to change,
    and the cache key of one task for them (the weights fingerprint fixed, to isolate everything else)."""
    import copy
    from types import SimpleNamespace

    import nltk

    from forgetting.evals import runner

    monkeypatch.setattr(runner, "TASKS_DIR", checkout_copy / "evals" / "tasks")
    monkeypatch.setattr(runner, "PROJECT_ROOT", checkout_copy)
    monkeypatch.setenv("FORGETTING_CACHE", str(tmp_path / "cache"))  # the NLTK data is built there
    monkeypatch.setenv("NLTK_DATA", os.environ.get("NLTK_DATA", ""))
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    originals = {path: path.read_bytes() for path in checkout_copy.rglob("*.*")}
    model, tok = tiny_eval_model
    fingerprint = weights_fingerprint(model)
    context = SimpleNamespace(
        model=copy.deepcopy(model),
        tok=copy.deepcopy(tok),
        root=checkout_copy,
        monkeypatch=monkeypatch,
        nltk_dir=tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english",
    )

    def key(task: str = "forgetting_target", **settings) -> str:
        settings = EvalSettings(tasks=[task], **settings)
        manager = runner.task_manager(settings)
        leaves = runner.leaf_tasks(manager, [task])
        return runner.cache_keys(context.model, context.tok, settings, manager, leaves, fingerprint)[task]

    yield context, key
    for path, data in originals.items():
        path.write_bytes(data)


def _edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def _version(name: str, value: str):
    import importlib.metadata

    real = importlib.metadata.version
    return lambda c: c.monkeypatch.setattr(importlib.metadata, "version", lambda n: value if n == name else real(n))


# (task, settings, change): each change must give another cache key
KEY_CHANGES = {
    "task yaml": (
        "forgetting_target",
        {},
        lambda c: _edit(c.root / "evals/tasks/forgetting_target.yaml", "max_gen_toks: 48", "max_gen_toks: 48 # x"),
    ),
    "leak markers": (
        "forgetting_format_health",
        {},
        lambda c: _edit(c.root / "evals/tasks/utils.py", '    "[/INST]",\n)', '    "[/INST]",\n    "<<SYS>>",\n)'),
    ),
    "target scorer": (
        "forgetting_target",
        {},
        lambda c: _edit(c.root / "harness/builtin_task.py", "def score(", "def score(  "),
    ),
    "chat template": ("forgetting_target", {}, lambda c: setattr(c.tok, "chat_template", c.tok.chat_template + " ")),
    "tokenizer, no chat template": (
        "forgetting_target",
        {"apply_chat_template": False},
        lambda c: c.tok.add_tokens(["<extra_token>"]),
    ),
    "nltk data": ("forgetting_ifeval", {}, lambda c: (c.nltk_dir / "abbrev_types.txt").open("a").write("xyz\n")),
    "dtype": ("forgetting_target", {}, lambda c: c.model.to(torch.bfloat16)),
    "attention": ("forgetting_target", {}, lambda c: setattr(c.model.config, "_attn_implementation", "eager")),
    "device": ("forgetting_target", {}, lambda c: c.model.to("meta")),
    "torch version": ("forgetting_target", {}, _version("torch", "0.0.1")),
    "transformers version": ("forgetting_target", {}, _version("transformers", "0.0.1")),
    "lm-eval version": ("forgetting_target", {}, _version("lm_eval", "0.0.1")),
}


@pytest.mark.parametrize("case", KEY_CHANGES)
def test_what_changes_a_score_changes_the_cache_key(key_case, case):
    context, key = key_case
    task, settings, change = KEY_CHANGES[case]
    before = key(task, **settings)
    change(context)
    assert key(task, **settings) != before


def test_the_same_things_keep_the_cache_key(key_case, tiny_eval_model, tmp_path):
    import copy

    from forgetting.evals import runner

    context, key = key_case
    model, tok = tiny_eval_model
    before = key()
    context.model, context.tok = copy.deepcopy(model), copy.deepcopy(tok)  # reloaded: new objects, same content
    context.tok("some text", truncation=True, max_length=4, padding="max_length")  # leaves state on the backend
    assert key() == before
    real = Path(runner.__file__).resolve().parent
    context.monkeypatch.setattr(runner, "TASKS_DIR", real / "tasks")  # the same files in another checkout
    context.monkeypatch.setattr(runner, "PROJECT_ROOT", real.parent)
    context.monkeypatch.setenv("FORGETTING_CACHE", str(tmp_path / "other_cache"))  # the NLTK data built again
    assert key() == before
    unapplied = key(apply_chat_template=False)
    context.tok.chat_template += " "
    assert key(apply_chat_template=False) == unapplied  # a template that is not applied does not count


def test_the_adapter_config_is_part_of_the_fingerprint(tiny_eval_model):
    import copy

    from peft import LoraConfig, get_peft_model

    model, _ = tiny_eval_model

    def adapted(**config):
        peft_model = get_peft_model(
            copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **config)
        )
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.fill_(0.01)  # the same adapter weights
        return peft_model

    alpha16 = weights_fingerprint(adapted(lora_alpha=16))
    assert weights_fingerprint(adapted(lora_alpha=16)) == alpha16
    assert weights_fingerprint(adapted(lora_alpha=64)) != alpha16
    assert weights_fingerprint(adapted(lora_alpha=16, use_rslora=True)) != alpha16
    # without the adapters (self-rehearsal's key of the base model) the config does not count either
    assert weights_fingerprint(adapted(lora_alpha=16), exclude="lora_") == weights_fingerprint(
        adapted(lora_alpha=64), exclude="lora_"
    )


def test_the_offline_suite_needs_no_index_of_lm_evals_tasks_and_keeps_its_keys(tiny_eval_model):
    from lm_eval.tasks import TaskManager

    from forgetting.evals import runner

    model, tok = tiny_eval_model
    settings = EvalSettings(tasks=["forgetting_target"])
    own = runner.task_manager(settings)
    assert "hellaswag" not in own.all_tasks  # indexing lm-eval's own tasks takes seconds
    full = TaskManager(include_path=[str(runner.TASKS_DIR)])
    keys = [
        runner.cache_keys(model, tok, settings, manager, runner.leaf_tasks(manager, settings.tasks), "w")
        for manager in (own, full)
    ]
    assert keys[0] == keys[1]


NO_GIT_SCRIPT = """
from forgetting.harness.config import ModelConfig
from forgetting.harness.formats import attach_format
from forgetting.harness.models import load_tokenizer, tiny_model
from forgetting.evals.runner import EvalSettings, evaluate
tok = load_tokenizer(ModelConfig())
attach_format(tok, "chatml")
evaluate(tiny_model(len(tok), seed=1).eval(), tok, EvalSettings(tasks=["forgetting_knowledge"], limit=1, batch_size=1))
print("evaluated")
"""


def test_evaluating_outside_a_git_checkout_prints_no_git_error(tmp_path):
    from forgetting.evals.runner import PROJECT_ROOT

    env = dict(
        os.environ,
        GIT_CEILING_DIRECTORIES=str(tmp_path.parent),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        [sys.executable, "-c", NO_GIT_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "evaluated" in result.stdout, result.stderr[-3000:]
    assert "fatal:" not in result.stdout + result.stderr
