"""What a rule's log says: the Hub client's mode as it is, no library noise, progress that reads on slow work."""

import logging
from types import SimpleNamespace

import pytest

import sftpipe.io
from sftpipe.entry import run_stage
from sftpipe.io import Progress


def _stage_log(tmp_path, stage, monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1") if offline else monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    smk = SimpleNamespace(rule="some_rule", threads=1, log=[str(tmp_path / "rule.log")], config={}, wildcards=SimpleNamespace())
    run_stage(smk, stage)
    return (tmp_path / "rule.log").read_text()


@pytest.mark.parametrize(("offline", "mode"), [(True, "offline mode"), (False, "online mode")])
def test_the_log_names_the_hub_clients_mode(tmp_path, monkeypatch, offline, mode):
    assert f"rule some_rule, Hugging Face Hub client in {mode}" in _stage_log(tmp_path, lambda: None, monkeypatch, offline)


def test_library_noise_stays_out_of_the_log(tmp_path, tiny_model, monkeypatch):
    def stage():
        from peft import LoraConfig, get_peft_model

        from sftpipe.model import load_model

        # peft asks for transformers' deprecated `is_gradient_checkpointing` as it wraps the model.
        get_peft_model(load_model(tiny_model), LoraConfig(r=2, target_modules="all-linear"))
        # What bitsandbytes logs on AVX512-BF16 CPUs when the Hub has no kernel for it.
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s", "offline"
        )
        logging.getLogger("sftpipe").warning("a warning of our own")

    text = _stage_log(tmp_path, stage, monkeypatch, offline=True)
    assert "FutureWarning" not in text and "gemm_4bit_forward" not in text
    assert "a warning of our own" in text


def test_slow_progress_shows_seconds_per_step_and_counts_only_the_steps_left(monkeypatch, caplog):
    clock = [1000.0]
    monkeypatch.setattr(sftpipe.io.time, "monotonic", lambda: clock[0])
    # A training resumed at step 10 of 20, whose steps take 95 s each.
    progress = Progress("train steps", 20, every=30.0, unit="step", done=10)
    with caplog.at_level(logging.INFO, logger="sftpipe"):
        clock[0] += 95
        progress.update()
        clock[0] += 95
        progress.update()
    assert caplog.messages == ["train steps: 11/20 (95.0 s/step, ETA 855s)", "train steps: 12/20 (95.0 s/step, ETA 760s)"]
