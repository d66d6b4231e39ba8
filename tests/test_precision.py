"""`auto` precision: bf16 only where the hardware computes it natively (a GPU with bf16, a CPU with
avx512_bf16/amx_bf16)."""

from __future__ import annotations

import json

import pytest
import torch

from forgetting.harness import precision
from forgetting.harness.config import ModelConfig
from forgetting.harness.errors import UserError
from forgetting.harness.models import pick_dtype
from forgetting.harness.precision import cpu_bf16, resolve_eval_dtype, resolve_precision
from forgetting.harness.train import train
from tests.helpers import tiny_job as job


@pytest.fixture
def cpu(monkeypatch):
    """Set what the CPU reports (its x86 flags, or None: not x86) with no override; detection re-runs."""
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    cpu_bf16.cache_clear()

    def set_flags(flags):
        monkeypatch.setattr(precision, "_x86_cpu_flags", lambda: flags)
        cpu_bf16.cache_clear()

    yield set_flags
    cpu_bf16.cache_clear()


@pytest.mark.parametrize(
    "flags, fast", [({"avx2", "fma"}, False), ({"avx2", "avx512f", "avx512_bf16"}, True), ({"avx2", "amx_bf16"}, True)]
)
def test_cpu_flags_decide_and_auto_follows(cpu, flags, fast):
    cpu(flags)
    assert cpu_bf16().fast is fast
    assert resolve_precision("auto", "cpu")[0] == ("bf16" if fast else "fp32")
    assert resolve_eval_dtype("auto", "cpu")[0] == ("bfloat16" if fast else "float32")
    assert pick_dtype(ModelConfig(), for_training=False) == (torch.bfloat16 if fast else torch.float32)
    assert pick_dtype(ModelConfig(), for_training=True) == torch.float32  # master weights stay fp32
    assert cpu_bf16().reason == (
        "CPU flags: " + ", ".join(sorted(flags & {"avx512_bf16", "amx_bf16"}))
        if fast
        else "CPU flags: no avx512_bf16 or amx_bf16 (bf16 is emulated)"
    )


def test_without_flags_a_measured_probe_decides(cpu, monkeypatch):
    cpu(None)
    calls = []
    monkeypatch.setattr(precision, "_probe", lambda: calls.append(1) or precision.Bf16Support(False, "measured: 75.0x"))
    assert resolve_precision("auto", "cpu") == ("fp32", "auto: measured: 75.0x")
    assert resolve_precision("auto", "cpu") and calls == [1]  # measured once per process


def test_the_probe_measures_this_cpu(cpu):
    result = precision._probe()
    assert result.reason.startswith("measured: a bf16 matmul takes") and isinstance(result.fast, bool)


def test_explicit_choices_are_kept_and_slow_bf16_says_so(cpu):
    cpu({"avx2"})
    assert resolve_precision("fp32", "cpu") == ("fp32", "as configured")
    chosen, why = resolve_precision("bf16", "cpu")
    assert chosen == "bf16" and "slow here" in why and "auto would choose fp32" in why
    assert resolve_eval_dtype("bfloat16", "cpu") == ("bfloat16", "as configured")


def test_cuda_and_other_devices(monkeypatch, cpu):
    cpu({"avx512_bf16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", "cuda") == ("fp32", "auto: CUDA GPU without bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cuda") == ("bf16", "auto: CUDA GPU with bf16")
    assert resolve_eval_dtype("auto", "mps")[0] == "float32"


def test_the_override_is_checked(cpu, monkeypatch):
    monkeypatch.setenv(precision.FORCE_ENV, "fast")
    with pytest.raises(UserError, match="FORGETTING_CPU_BF16='fast': expected 'native' or 'emulated'"):
        cpu_bf16()


@pytest.mark.parametrize("support", ["native", "emulated"])
def test_the_loop_trains_in_the_precision_auto_chose(tmp_path, monkeypatch, capsys, support):
    """Both branches end to end on the tiny model: the log names the choice, the forward runs under it."""
    monkeypatch.setenv(precision.FORCE_ENV, support)
    cpu_bf16.cache_clear()
    autocast_dtypes = []
    original = torch.autocast.__init__

    def spy(self, device_type, dtype=None, *args, **kwargs):
        autocast_dtypes.append(dtype if kwargs.get("enabled", True) else None)
        original(self, device_type, dtype, *args, **kwargs)

    monkeypatch.setattr(torch.autocast, "__init__", spy)
    train(job(tmp_path))
    cpu_bf16.cache_clear()
    expected = "bf16" if support == "native" else "fp32"
    assert f"precision: {expected} (auto: FORGETTING_CPU_BF16={support})" in capsys.readouterr().out
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert (torch.bfloat16 in autocast_dtypes) is (support == "native")
    # test_train's pinned fp32 losses: exact in fp32, close under bf16 autocast
    assert losses == pytest.approx([10.76771, 10.67202], abs=2e-4 if support == "emulated" else 0.05)
