"""Mutation checks: break the code a test guards, and see the test fail.

Each mutation replaces one snippet of a file in a scratch copy of the working tree (with
../shared beside it, as the tests expect), runs the tests that guard it, and counts as killed when
they fail. The same tests run first on the unmutated copy, once per set of tests, and must pass. Writes JSON.

    .venv/bin/python bench/mutations.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    breaks: str  # the feature it removes


T = "tests/test_train_merge.py::"
E = "tests/test_export.py::"
P = "tests/test_preference.py::"
R = "tests/test_report.py::"
RL = "tests/test_rl.py::"
L = "tests/test_launch.py::"
S = "tests/test_step_pieces.py::"
# The real two-node SLURM (network namespaces; root): one job per node, rendezvous, gloo over the bridge.
N = ("tests/test_slurm_nodes.py::test_a_two_node_job_ran_one_rank_on_each_node",)
MUTATIONS = [
    Mutation(
        "resume-from-scratch",
        "sftpipe/train.py",
        "trainer.train(resume_from_checkpoint=str(resume) if resume else None)",
        "trainer.train(resume_from_checkpoint=None)",
        (T + "test_sigkill_then_rerun_resumes_from_the_last_checkpoint",),
        "resuming a killed run from its checkpoint",
    ),
    Mutation(
        "ddp-bypassed",
        "sftpipe/train.py",
        "completion_loss(model, inputs, self.accelerator.unwrap_model(model), self.fused_loss)",
        "completion_loss(self.accelerator.unwrap_model(model), inputs, self.accelerator.unwrap_model(model), self.fused_loss)",
        (T + "test_data_parallel_ranks_train_one_adapter_on_disjoint_rows",),
        "gradient all-reduce across data-parallel ranks",
    ),
    Mutation(
        "per-process-batch",
        "sftpipe/train.py",
        "per_device = settings.batch_size // self.world_size",
        "per_device = settings.batch_size",
        (T + "test_data_parallel_ranks_train_one_adapter_on_disjoint_rows",),
        "batch_size counted over all processes",
    ),
    Mutation(
        "dora-ignored",
        "sftpipe/train.py",
        "use_dora=settings.use_dora,",
        "use_dora=False,",
        (T + "test_dora_trains_magnitude_vectors",),
        "train.use_dora",
    ),
    Mutation(
        "rslora-ignored",
        "sftpipe/train.py",
        "use_rslora=settings.use_rslora,",
        "use_rslora=False,",
        (T + "test_rslora_scales_by_alpha_over_the_square_root_of_r",),
        "train.use_rslora",
    ),
    Mutation(
        "modules-to-save-ignored",
        "sftpipe/train.py",
        "modules_to_save=settings.modules_to_save,",
        "modules_to_save=None,",
        (T + "test_modules_to_save_trains_a_full_copy_of_the_module",),
        "train.modules_to_save",
    ),
    Mutation(
        "amx-not-native",
        "sftpipe/precision.py",
        'flags & {"avx512_bf16", "amx_bf16"}',
        'flags & {"avx512_bf16"}',
        (T + "test_native_bf16_is_read_from_the_cpu_flags",),
        "bf16 on AMX hosts",
    ),
    Mutation(
        "auto-always-bf16",
        "sftpipe/precision.py",
        'return "bf16" if cpu_has_native_bf16(cpuinfo) else "fp32"',
        'return "bf16"',
        (T + "test_auto_precision_follows_the_hardware",),
        "precision auto on a CPU without native bf16",
    ),
    Mutation(
        "fused-loss-counts-prompts",
        "sftpipe/loss.py",
        "total += ((log_norm - logits.gather(1, picked[:, None]).squeeze(1).float()) * learned).sum()",
        "total += (log_norm - logits.gather(1, picked[:, None]).squeeze(1).float()).sum()",
        (T + "test_training_with_the_fused_loss_matches_full_logits",),
        "the fused loss ignoring prompt positions",
    ),
    Mutation(
        "normalized-is-strict",
        "sftpipe/metrics.py",
        "return normalize_answer(prediction) == normalize_answer(reference)",
        "return prediction.strip() == reference.strip()",
        ("tests/test_evaluate.py::test_exact_match_scores_predictions_against_references",),
        "normalized exact match",
    ),
    Mutation(
        "lm-eval-chat-template-forced",
        "sftpipe/evaluate.py",
        "apply_chat_template=spec.apply_chat_template,",
        "apply_chat_template=True,",
        ("tests/test_evaluate.py::test_lm_eval_runs_arc_and_hellaswag_offline",),
        "lm-eval run with the configured prompt settings",
    ),
    Mutation(
        "not-atomic",
        "sftpipe/io.py",
        "    final.parent.mkdir(parents=True, exist_ok=True)\n    remove_stale_temporaries(final)\n",
        "    final.parent.mkdir(parents=True, exist_ok=True)\n    yield final\n    return\n",
        ("tests/test_data.py::test_bad_local_file_names_the_line_and_leaves_nothing",),
        "atomic writes: no partial artifact",
    ),
    Mutation(
        "hub-revision-unpinned",
        "sftpipe/data.py",
        "return HfApi().dataset_info(spec.hub_id, revision=spec.revision).sha",
        "return spec.revision",
        ("tests/test_hub.py::test_gated_hub_download_uses_the_token_and_pins_the_commit",),
        "the manifest's pinned Hub commit",
    ),
    Mutation(
        "export-serve-unchecked",
        "sftpipe/export.py",
        "if settings.gguf and settings.serve not in settings.gguf:",
        "if False:",
        (E + "test_bad_export_settings_name_the_key",),
        "export.serve checked against export.gguf",
    ),
    Mutation(
        "sdist-unpinned",
        "sftpipe/export.py",
        "    if got != sha256:\n",
        "    if False:\n",
        (E + "test_the_converter_is_taken_from_the_pinned_sdist_alone",),
        "the converter only from the pinned sdist",
    ),
    Mutation(
        "q4-k-m-fails-late",
        "sftpipe/export.py",
        "        llama_cpp = _llama_cpp()  # before converting anything",
        "        pass  # before converting anything",
        (E + "test_q4_k_m_without_llama_cpp_names_the_key_and_how_to_install_it",),
        "a missing quantizer named before anything is fetched or converted",
    ),
    Mutation(
        "export-not-atomic",
        "sftpipe/export.py",
        "    with atomic_path(out_dir) as tmp:\n        tmp.mkdir()\n",
        "    for tmp in [Path(out_dir)]:\n        tmp.mkdir(parents=True)\n",
        (E + "test_a_model_the_converter_cannot_read_fails_and_leaves_nothing",),
        "no export directory from a failed conversion",
    ),
    Mutation(
        "modelfile-any-template-is-chatml",
        "sftpipe/export.py",
        "            return None\n    except Exception:",
        "            pass\n    except Exception:",
        (E + "test_a_template_it_cannot_translate_is_left_to_ollama",),
        "only a ChatML chat template translated to Ollama's",
    ),
    Mutation(
        "f16-written-as-bf16",
        "sftpipe/export.py",
        '"f16": GgufType(outtype="f16"),',
        '"f16": GgufType(outtype="bf16"),',
        (E + "test_gguf_metadata_holds_the_tokenizer_and_the_chat_template", E + "test_transformers_reads_back_the_merged_model"),
        "each GGUF file of the type its name says",
    ),
    Mutation(
        "q4-k-m-quantized-as-q8-0",
        "sftpipe/export.py",
        'GgufType(llama_ftype="Q4_K_M")',
        'GgufType(llama_ftype="Q8_0")',
        (E + "test_q4_k_m_is_quantized_by_llama_cpp_from_f16",),
        "q4_k_m made by llama.cpp's K-quant quantizer",
    ),
    Mutation(
        "modelfile-serves-the-first-type",
        "sftpipe/export.py",
        "ollama_modelfile(tokenizer, settings.file(name))",
        "ollama_modelfile(tokenizer, settings.file(name, settings.gguf[0]))",
        (E + "test_export_writes_the_gguf_files_a_modelfile_and_a_manifest",),
        "the Modelfile serves export.serve's file",
    ),
    Mutation(
        "manifest-without-sha256",
        "sftpipe/export.py",
        '"bytes": path.stat().st_size, "sha256": sha256_file(path)}',
        '"bytes": path.stat().st_size}',
        (E + "test_export_writes_the_gguf_files_a_modelfile_and_a_manifest",),
        "each exported file's sha256 in the manifest",
    ),
    Mutation(
        "pip-failure-unchecked",
        "sftpipe/export.py",
        "    if pip.returncode != 0 or not found:\n",
        "    if False:\n",
        (E + "test_no_package_index_is_a_clear_error_and_caches_nothing",),
        "a failed download of the converter named, nothing cached",
    ),
    Mutation(
        "exported-variant-reads-safetensors",
        "sftpipe/evaluate.py",
        'gguf = {"gguf_file": gguf_file} if gguf_file else {}',
        "gguf = {}",
        (E + "test_exact_match_of_the_exported_model_reads_its_gguf_file_alone",),
        "the exported variant scores the GGUF file itself",
    ),
    Mutation(
        "export-settings-default-drifts",
        "sftpipe/export.py",
        '    serve: str = "q8_0"\n',
        '    serve: str = "f16"\n',
        ("tests/test_config.py::test_export_settings_defaults_are_the_schema_defaults",),
        "one source of the export defaults",
    ),
    Mutation(
        "export-config-unchecked-by-the-workflow",
        "rules/common.smk",
        'EXPORT = checked(workflow, lambda: ExportSettings.from_config(config["export"]))',
        'EXPORT = ExportSettings(tuple(config["export"]["gguf"]), config["export"]["serve"])',
        ("tests/test_pipeline.py::test_a_bad_config_prints_each_key_first_and_alone",),
        "a served type that is not exported stops the workflow before anything runs",
    ),
    Mutation(
        "report-without-the-exported-column",
        "sftpipe/report.py",
        "return self.variants + ((EXPORTED,) if EXPORTED in self.exact_match else ())",
        "return self.variants",
        ("tests/test_pipeline.py::test_exporting_adds_the_gguf_files_and_the_exported_column_and_reruns_nothing_else",),
        "the exported model's exact match in the report",
    ),
    Mutation(
        "modelfile-no-system",
        "sftpipe/export.py",
        "        if system:\n",
        "        if False:\n",
        (E + "test_a_chatml_template_becomes_ollamas_go_template",),
        "the chat template's default system prompt in the Modelfile",
    ),
    Mutation(
        "gated-traceback",
        "sftpipe/data.py",
        '"check the id, or, for a gated or private dataset, accept its terms on the Hub and set HF_TOKEN"',
        '"check the id"',
        ("tests/test_hub.py::test_gated_hub_download_without_token_fails_and_writes_nothing",),
        "a clear error for a gated dataset",
    ),
    Mutation(
        "fsdp-saves-one-shard",
        "sftpipe/train.py",
        "state = gathered_state(self.trainer.model) if self.fsdp else None",
        "state = None",
        ("tests/test_fsdp.py::test_fsdp_trains_as_ddp_does_and_saves_the_whole_adapter",),
        "the whole adapter gathered from every FSDP process",
    ),
    Mutation(
        "cpu-job-asks-for-the-bare-estimate",
        "sftpipe/resources.py",
        'HEADROOM = {"cpu": 1.4, "cuda": 1.2}',
        'HEADROOM = {"cpu": 1.2, "cuda": 1.2}',
        ("tests/test_resources.py::test_the_demo_training_job_asks_for_more_than_it_used",),
        "a CPU training job asks for more memory than the demo's measured peak",
    ),
    Mutation(
        "fsdp-resumes-ddp-checkpoints",
        "sftpipe/train.py",
        'layout = {"checkpoints": "sharded"} if self.fsdp else {}',
        "layout = {}",
        ("tests/test_fsdp.py::test_fsdp_and_ddp_never_resume_each_others_checkpoints",),
        "a run under one strategy never resumes another strategy's checkpoint",
    ),
    Mutation(
        "fsdp-arguments-dropped",
        "sftpipe/train.py",
        "return fsdp_arguments(self.model) if self.fsdp else {}",
        "return {}",
        ("tests/test_fsdp.py::test_fsdp_shards_every_parameter_while_it_trains_as_ddp_does",),
        "train.strategy: fsdp shards the model",
    ),
    Mutation(
        "fsdp-dropped-on-cpu",
        "sftpipe/train.py",
        "            shard_where_accelerate_does_not(self)\n",
        "",
        ("tests/test_fsdp.py::test_fsdp_shards_every_parameter_while_it_trains_as_ddp_does",),
        "FSDP on CPU, where accelerate drops it without a word",
    ),
    Mutation(
        "fsdp-unsharded-unnoticed",
        "sftpipe/fsdp.py",
        "            if unsharded := unsharded_parameters(model):",
        "            if unsharded := []:",
        ("tests/test_fsdp.py::test_a_run_asked_to_shard_fails_where_nothing_shards",),
        "a run asked to shard fails at its first step when the model is not sharded",
    ),
    Mutation(
        "mcnemar-one-sided",
        "sftpipe/significance.py",
        'return {"base_only": base_only, "tuned_only": tuned_only, "p_value": min(1.0, 2 * tail)}',
        'return {"base_only": base_only, "tuned_only": tuned_only, "p_value": min(1.0, tail)}',
        ("tests/test_significance.py",),
        "McNemar's two-sided exact p-value",
    ),
    Mutation(
        "fused-loss-unlearned-rows-get-gradient",
        "sftpipe/loss.py",
        "                probs[~learned] = 0",
        "                pass",
        (T + "test_fused_loss_equals_cross_entropy_over_full_logits",),
        "the fused loss's gradient is zero at positions whose target is ignored",
    ),
    Mutation(
        "fused-loss-log-normalizer-is-the-largest-logit",
        "sftpipe/loss.py",
        "log_norm = logits.amax(dim=-1).float() - probs.amax(dim=-1).log()",
        "log_norm = logits.amax(dim=-1).float()",
        (T + "test_fused_loss_equals_cross_entropy_over_full_logits",),
        "the fused loss's log normalizer from one softmax pass: the largest logit minus its log probability",
    ),
    Mutation(
        "fused-loss-input-precision",
        "sftpipe/loss.py",
        "logits = hidden[start : start + rows].to(weight.dtype) @ weight.T",
        "logits = hidden[start : start + rows] @ weight.T",
        (T + "test_training_with_the_fused_loss_matches_full_logits",),
        "the fused loss on a bf16 base",
    ),
    Mutation(
        "near-dedup-unverified",
        "sftpipe/dedup.py",
        " for k in others if np.count_nonzero(minhash(k) == mine) >= threshold * NUM_PERM]",
        " for k in others]",
        ("tests/test_filters.py::test_near_dedup_finds_pairs_above_the_threshold_and_keeps_those_below",),
        "near-dedup keeping candidates below the threshold",
    ),
    Mutation(
        "near-dedup-bands-at-threshold",
        "sftpipe/dedup.py",
        "CANDIDATE_MARGIN = 0.15",
        "CANDIDATE_MARGIN = 0.0",
        ("tests/test_filters.py::test_near_dedup_finds_pairs_above_the_threshold_and_keeps_those_below",),
        "near-dedup recall just above the threshold",
    ),
    Mutation(
        "minhash-out-of-order",
        "sftpipe/filters.py",
        "self._take(*pending.pop(0))",
        "self._take(*pending.pop(-1))",
        ("tests/test_filters.py::test_filters_write_the_same_bytes_with_any_number_of_workers",),
        "the same bytes with any number of MinHash workers",
    ),
    Mutation(
        "pair-reply-without-eos",
        "sftpipe/tokenization.py",
        'pair["rejected_ids"] = rejected["input_ids"][n_prompt:]',
        'pair["rejected_ids"] = rejected["input_ids"][n_prompt:-1]',
        (P + "test_each_reply_is_masked_as_itself_plus_eos",),
        "each preference reply tokenized as itself plus EOS",
    ),
    Mutation(
        "reference-recomputed",
        "sftpipe/preference_train.py",
        "precompute_ref_log_probs=True,",
        "precompute_ref_log_probs=False,",
        (P + "test_the_reference_is_read_from_its_artifact_and_never_recomputed",),
        "reference log-probs read from the reference stage's artifact",
    ),
    Mutation(
        "missing-reference-unnoticed",
        "sftpipe/reference.py",
        "    missing = [i for i in ids if i not in reference]",
        "    missing = []",
        (P + "test_a_pair_the_reference_lacks_is_an_error",),
        "a pair without reference log-probs named as an error",
    ),
    Mutation(
        "rejected-is-chosen",
        "sftpipe/preference_train.py",
        '"rejected_ids": p["rejected_ids"],',
        '"rejected_ids": p["chosen_ids"],',
        (P + "test_the_preference_loss_goes_down",),
        "the preference loss learning chosen over rejected",
    ),
    Mutation(
        "reward-without-reference",
        "sftpipe/reference.py",
        "beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)",
        "beta * chosen, beta * rejected",
        (P + "test_held_out_rewards_are_against_the_reference",),
        "held-out rewards measured against the reference",
    ),
    Mutation(
        "compact-path-leaks",
        "sftpipe/preference_train.py",
        "        trl_utils._use_triton = original",
        "        pass",
        (P + "test_scoring_only_completion_positions_changes_no_loss",),
        "TRL's private switch restored after preference training",
    ),
    Mutation(
        "reference-per-experiment",
        "sftpipe/experiments.py",
        "resolved[e.name] = replace(e, preference_data_owner=data)",
        "resolved[e.name] = replace(e, preference_data_owner=e.name)",
        (P + "test_a_two_experiment_sweep_plans_one_reference_job",),
        "one reference job for a sweep over preference settings",
    ),
    Mutation(
        "pairs-not-against-sft-test",
        "sftpipe/filters.py",
        'for path in held_out_paths for r in read_jsonl(path) if row_split(r, split) == "test"',
        'for path in held_out_paths for r in read_jsonl(path) if row_split(r, split) == "none"',
        (P + "test_pairs_sharing_words_with_the_sft_test_rows_are_removed",),
        "preference pairs decontaminated against the SFT test rows",
    ),
    Mutation(
        "hh-prompts-unchecked",
        "sftpipe/formats.py",
        "if system != other_system or pairs[:-1] != other_pairs[:-1] or pairs[-1][0] != other_pairs[-1][0]:",
        "if system != other_system:",
        (P + "test_bad_pairs_name_file_line_and_field_and_leave_nothing",),
        "chosen and rejected required to share their prompt",
    ),
    Mutation(
        "equal-replies-kept",
        "sftpipe/data.py",
        'if "chosen" in rendered and rendered["chosen"] == rendered["rejected"]:',
        "if False:",
        (P + "test_pairs_with_nothing_to_learn_are_skipped_with_a_warning",),
        "pairs of equal replies skipped",
    ),
    Mutation(
        "sft-adapter-not-loaded",
        "sftpipe/preference_train.py",
        "        if self.job.sft_adapter_dir is not None:\n            from peft import PeftModel",
        "        if False:\n            from peft import PeftModel",
        (P + "test_the_sft_adapter_kept_training_starts_at_its_reference",),
        "preference.start: adapter trains on the SFT adapter",
    ),
    Mutation(
        "adapter-start-on-merged",
        "rules/common.smk",
        'if experiment_of(wildcards).preference["start"] == "adapter":',
        "if False:",
        (P + "test_keeping_the_sft_adapter_trains_and_merges_over_the_base_model",),
        "preference.start: adapter trains and merges over the base model",
    ),
    Mutation(
        "preference-not-compared",
        "sftpipe/report.py",
        'paired += significance(predictions, harness, "tuned", "preference")',
        "pass",
        (P + "test_the_report_sets_sft_and_preference_tuning_side_by_side",),
        "SFT+preference vs SFT paired significance in the report",
    ),
    Mutation(
        "report-without-preference",
        "sftpipe/report.py",
        'lines += ["", *preference_lines(report.preference)]',
        "pass",
        (P + "test_the_report_sets_sft_and_preference_tuning_side_by_side",),
        "held-out reward accuracy and margins in the report",
    ),
    Mutation(
        "reference-in-fp32",
        "sftpipe/reference.py",
        "model = load_model(model_dir, trust_remote_code, dtype=COMPUTE_DTYPES[precision])",
        "model = load_model(model_dir, trust_remote_code, dtype=torch.float32)",
        (P + "test_the_reference_is_read_from_its_artifact_and_never_recomputed",),
        "reference log-probs computed with the weights the policy trains on (bf16 where it trains in bf16)",
    ),
    Mutation(
        "reference-without-autocast",
        "sftpipe/reference.py",
        'if precision == "fp32":\n        return contextlib.nullcontext()',
        "if True:\n        return contextlib.nullcontext()",
        (P + "test_the_reference_is_read_from_its_artifact_and_never_recomputed",),
        "reference log-probs computed under the trainer's autocast",
    ),
    Mutation(
        "reference-adapter-merged-away",
        "sftpipe/reference.py",
        "    if adapter_dir is not None:\n        from peft import PeftModel",
        "    if False:\n        from peft import PeftModel",
        (P + "test_the_sft_adapter_kept_training_starts_at_its_reference",),
        "the reference of preference.start: adapter is the base model under the SFT adapter",
    ),
    Mutation(
        "reference-forward-unguarded",
        "sftpipe/preference_train.py",
        "if self.forwards != 1:",
        "if False:",
        (P + "test_a_reference_forward_in_the_loss_is_an_error",),
        "a reference forward in the preference loss is an error",
    ),
    Mutation(
        "reference-precision-unchecked",
        "sftpipe/preference_train.py",
        "        reference_precision(job.reference_info_path, job.settings.precision)\n",
        "",
        (P + "test_a_reference_of_another_precision_is_an_error",),
        "a reference computed in another precision than preference tuning trains in is an error",
    ),
    Mutation(
        "reference-shared-across-precisions",
        "sftpipe/experiments.py",
        '                and o.preference_train.get("precision") == e.preference_train.get("precision")\n',
        "",
        (P + "test_a_sweep_over_the_preference_precision_plans_a_reference_per_precision",),
        "experiments training preferences in different precisions get their own reference",
    ),
    Mutation(
        "lm-eval-first-document-unnamed",
        "sftpipe/tasks.py",
        "check_documents(built_task(manager, spec.name, tmp, config, locations), config, locations)",
        "check_documents(build_task(manager, TaskSpec(spec.name, data_dir=str(tmp))), config, locations)",
        ("tests/test_tasks.py::test_a_document_the_task_cannot_read_names_task_file_line_and_value",),
        "a first document lm-eval cannot build its task from is named by file, line and value",
    ),
    Mutation(
        "precision-left-to-the-host",
        "tests/conftest.py",
        '    monkeypatch.setattr("sftpipe.precision.host_precision", host_precision)\n',
        "",
        ("tests/test_train_merge.py::test_the_test_suite_pins_precision",),
        "a test left at train.precision: auto fails",
    ),
    Mutation(
        "bench-bf16-not-on-cpu",
        "bench/train_throughput.py",
        "use_cpu=not torch.cuda.is_available(),",
        "use_cpu=False,",
        ("tests/test_bench.py",),
        "the TRL baselines' bf16 configuration accepted by transformers on a CPU",
    ),
    Mutation(
        "install-without-tcmalloc",
        "cluster/install-allocator.sh",
        'elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then',
        "elif false; then",
        ("tests/test_install.py",),
        "make install gives a root user tcmalloc",
    ),
    Mutation(
        "data-per-experiment",
        "sftpipe/experiments.py",
        "data = next(o.name for o in by_name if data_key(o) == data_key(e))",
        "data = e.name",
        ("tests/test_experiments.py::test_a_lora_r_sweep_plans_the_data_stages_and_the_base_scores_once",),
        "one mix, tokenization and base exact match for a sweep over training keys",
    ),
    Mutation(
        "glibc-sized-as-tcmalloc",
        "sftpipe/resources.py",
        'ALLOCATOR_OVERHEAD = {"tcmalloc": 1.0, "jemalloc": 1.5, "system": 1.5}',
        'ALLOCATOR_OVERHEAD = {"tcmalloc": 1.0, "jemalloc": 1.0, "system": 1.0}',
        ("tests/test_resources.py::test_the_estimate_holds_on_the_allocator_the_job_gets",),
        "the memory a training job asks for follows its allocator",
    ),
    Mutation(
        "idle-host-runtime",
        "sftpipe/resources.py",
        'SUSTAINED_FLOPS = {"cpu": 5e9, "cuda": 50e12}',
        'SUSTAINED_FLOPS = {"cpu": 20e9, "cuda": 50e12}',
        ("tests/test_resources.py::test_the_estimate_holds_on_the_allocator_the_job_gets",),
        "the time a CPU training job asks for holds on a shared host",
    ),
    Mutation(
        "allocator-unexplained",
        "sftpipe/launch.py",
        'log.info("allocator %s: %s", allocator, why)',
        'log.info("allocator %s", allocator)',
        (T + "test_the_training_log_names_the_allocator_and_why",),
        "the training log says which allocator was picked and why",
    ),
    Mutation(
        "dataset-path-checked-late",
        "rules/common.smk",
        "checked(workflow, lambda: [check_local_path(dataset_spec(d)) for d in DATASETS])",
        "pass",
        ("tests/test_config.py::test_what_the_config_alone_can_tell_stops_the_plan_in_one_line",),
        "a dataset path that does not exist reported when the workflow is planned",
    ),
    Mutation(
        "task-name-checked-late",
        "rules/common.smk",
        "checked(workflow, lambda: check_task_names(list(EVAL_TASKS)))",
        "pass",
        ("tests/test_config.py::test_what_the_config_alone_can_tell_stops_the_plan_in_one_line",),
        "an unknown lm-eval task name reported when the workflow is planned",
    ),
    Mutation(
        "target-read-as-config",
        "Snakefile",
        "checked(workflow, lambda: check_config_files(workflow.configfiles))",
        "pass",
        ("tests/test_config.py::test_a_target_after_configfile_is_named_as_one",),
        "a target given after --configfile named as one",
    ),
    Mutation(
        "json-column-of-next-line",
        "sftpipe/io.py",
        'json.loads(raw.decode("utf-8").rstrip("\\r\\n"))',
        'json.loads(raw.decode("utf-8"))',
        ("tests/test_data.py::test_bad_local_file_names_the_line_and_leaves_nothing",),
        "malformed JSON reported at file:line:column as Python's parser gives it",
    ),
    Mutation(
        "generate-loads-before-checking",
        "sftpipe/generate.py",
        "    check_arguments(model_dir, template, adapter_dir)\n",
        "",
        (T + "test_generate_checks_its_arguments_before_loading_weights",),
        "python -m sftpipe.generate checks --model, --adapter and --template before loading weights",
    ),
    Mutation(
        "exact-match-first-rows",
        "sftpipe/evaluate.py",
        "rows = sample_rows(list(read_jsonl(test_path)), limit, seed)",
        "rows = list(read_jsonl(test_path))[:limit]",
        ("tests/test_evaluate.py::test_a_limit_scores_a_seeded_sample_of_every_dataset",),
        "eval.exact_match.limit scores a seeded sample of every dataset, not the first rows",
    ),
    Mutation(
        "library-noise-logged",
        "sftpipe/entry.py",
        "        silence_library_noise()\n",
        "",
        ("tests/test_logs.py::test_library_noise_stays_out_of_the_log",),
        "peft's FutureWarning and bitsandbytes' missing-kernel warning kept out of rule logs",
    ),
    Mutation(
        "hub-reachability-claimed",
        "sftpipe/entry.py",
        'hub = "offline mode (HF_HUB_OFFLINE)" if offline else "online mode (HF_HUB_OFFLINE unset)"',
        'hub = "offline" if offline else "online"',
        ("tests/test_logs.py::test_the_log_names_the_hub_clients_mode",),
        "the log names the Hub client's mode, not a reachability it never checked",
    ),
    Mutation(
        "progress-rate-only",
        "sftpipe/io.py",
        'pace = f"{rate:.1f}/s" if rate >= 1 or not rate else f"{1 / rate:.1f} s/{self.unit}"',
        'pace = f"{rate:.1f}/s"',
        ("tests/test_logs.py::test_slow_progress_shows_seconds_per_step_and_counts_only_the_steps_left",),
        "slow progress shown in seconds per step",
    ),
    Mutation(
        "progress-eta-counts-resumed-steps",
        "sftpipe/train.py",
        'unit="step", done=state.global_step)',
        'unit="step")',
        (T + "test_sigkill_then_rerun_resumes_from_the_last_checkpoint",),
        "a resumed training's ETA counts only the steps left",
    ),
    Mutation(
        "empty-system-prompt-dropped",
        "sftpipe/formats.py",
        'messages = [{"role": "system", "content": ex.system}] if ex.system is not None else []',
        'messages = [{"role": "system", "content": ex.system}] if ex.system else []',
        ("tests/test_data.py::test_an_empty_system_prompt_stays_empty",),
        "an explicitly empty system prompt kept as an empty system turn, not the chat template's default",
    ),
    Mutation(
        "estimate-ignores-allocator",
        "rules/common.smk",
        'allocator = job_allocator(train["allocator"])',
        'allocator = "tcmalloc"',
        ("tests/test_resources.py::test_the_plan_sizes_training_for_the_allocator_it_names",),
        "the workflow sizes a training job for the allocator it will run on",
    ),
    Mutation(
        "train-imports-launch",
        "sftpipe/train.py",
        "from .execution import STRATEGY_VARIABLE, current_allocator",
        "from .launch import STRATEGY_VARIABLE, current_allocator",
        ("tests/test_structure.py::test_the_package_has_no_import_cycle",),
        "no import cycle in the package",
    ),
    Mutation(
        "long-function",
        "sftpipe/metrics.py",
        "def strict_match(prediction: str, reference: str) -> bool:\n",
        "def strict_match(prediction: str, reference: str) -> bool:\n" + "    pass\n" * 80,
        ("tests/test_structure.py::test_no_function_outside_the_tests_is_over_80_lines",),
        "no function over 80 lines",
    ),
    Mutation(
        "evaluate-metrics-hard-coded",
        "sftpipe/evaluate.py",
        "**{name: metric.score(prediction, reference) for name, metric in EXACT_MATCH_METRICS.items()},",
        '**{name: EXACT_MATCH_METRICS[name].score(prediction, reference) for name in ("exact_match", "token_f1")},',
        (R + "test_a_registered_metric_reaches_evaluation_and_the_report",),
        "evaluation scores every registered metric",
    ),
    Mutation(
        "report-metrics-hard-coded",
        "sftpipe/report.py",
        "    for key in EXACT_MATCH_METRICS:\n",
        '    for key in ("exact_match", "normalized_exact_match", "token_f1"):\n',
        (R + "test_a_registered_metric_reaches_evaluation_and_the_report",),
        "the report shows every registered metric",
    ),
    Mutation(
        "mcnemar-on-scores",
        "sftpipe/report.py",
        "if EXACT_MATCH_METRICS[metric].right_or_wrong:",
        "if True:",
        ("tests/test_significance.py",),
        "McNemar's test only for right/wrong metrics",
    ),
    Mutation(
        "data-tables-untitled",
        "sftpipe/report.py",
        'f"<h3>{html.escape(title)}</h3><p>{html.escape(counts)}</p>" + _html_table(headers, rows)',
        "_html_table(headers, rows)",
        (R + "test_the_data_tables_have_titles_and_say_what_their_rows_count",),
        "the report's data tables titled, saying what their rows count",
    ),
    Mutation(
        "samples-repeat-the-system-prompt",
        "sftpipe/report.py",
        'start = shared_prompt_start([r[0]["prompt"] for r in rows])',
        'start = ""',
        (R + "test_the_samples_show_the_prompts_shared_start_once",),
        "the samples' shared prompt start shown once",
    ),
    Mutation(
        "figures-untitled",
        "sftpipe/report.py",
        "    if title:\n        fig.suptitle(title)",
        "    if False:\n        fig.suptitle(title)",
        (R + "test_every_figure_names_its_experiment",),
        "every figure names its experiment",
    ),
    Mutation(
        "workflow-page-single-experiment-only",
        "report/workflow.rst",
        '{%- if snakemake.config.get("experiments") %}',
        "{%- if False %}",
        (R + "test_the_report_pages_name_their_experiments_in_a_sweep_too",),
        "the report's Workflow page in a sweep",
    ),
    Mutation(
        "report-artifact-unlabelled",
        "rules/report.smk",
        '            labels={"experiment": "{experiment}", "artifact": "loss curves"},\n',
        "",
        (R + "test_the_report_rules_label_each_artifact_with_its_experiment",),
        "each report artifact labelled with its experiment",
    ),
    Mutation(
        "copies-not-renamed",
        "sftpipe/mixing.py",
        """yield {**rows[index], "id": f"{rows[index]['id']}#copy{made[index]}"}""",
        "yield rows[index]",
        ("tests/test_filters.py::test_mixing_fraction_count_and_upsampling",),
        "each upsampled copy named <id>#copy<k>",
    ),
    Mutation(
        "results-page-stale",
        "bench/results/train_throughput.json",
        '"real_tokens_per_s": 174.22723178014675',
        '"real_tokens_per_s": 190.0',
        ("tests/test_results_page.py",),
        "bench/RESULTS.md written from the benchmarks' JSON",
    ),
    Mutation(
        "readme-without-results-link",
        "README.md",
        "[bench/RESULTS.md](bench/RESULTS.md)",
        "bench/RESULTS.md",
        ("tests/test_results_page.py::test_the_readme_links_the_results_page",),
        "the README links the results page",
    ),
    Mutation(
        "rl-rewards-shuffled-references",
        "sftpipe/rewards.py",
        "return [float(metric(c, r)) for c, r in zip(completions, references, strict=True)]",
        "return [float(metric(c, r)) for c, r in zip(completions, references[1:] + references[:1], strict=True)]",
        (RL + "test_rewards_score_each_completion_against_its_own_row",),
        "each completion rewarded against its own row's reference",
    ),
    Mutation(
        "rl-user-reward-without-fields",
        "sftpipe/rewards.py",
        'fields = {k: v for k, v in rows.items() if k != "reference"}',
        "fields = {}",
        (RL + "test_a_user_reward_gets_the_rows_fields",),
        "the user's reward called with the rows' fields",
    ),
    Mutation(
        "rl-reward-failure-unnamed",
        "sftpipe/rewards.py",
        "f\"reward {name} raised on row {rows['id'][i]} (completion {completions[i]!r}): \"",
        'f"reward {name} raised: "',
        (RL + "test_a_failing_reward_is_named_with_its_row",),
        "a reward that raises named with the row it fails on",
    ),
    Mutation(
        "rl-reward-length-unchecked",
        "sftpipe/rewards.py",
        "if len(rewards) != len(completions):",
        "if False:",
        (RL + "test_a_failing_reward_is_named_with_its_row",),
        "a reward returning the wrong number of values is an error",
    ),
    Mutation(
        "rl-format-reward-without-pattern",
        "sftpipe/rl_settings.py",
        'if (self.kind == "format") != (self.pattern is not None):',
        "if False:",
        (RL + "test_reward_config_errors_name_the_key",),
        "a format reward without a pattern is a config error",
    ),
    Mutation(
        "rl-default-drifts-from-schema",
        "sftpipe/rl_settings.py",
        "beta: float = 0.0",
        "beta: float = 0.04",
        (RL + "test_rl_settings_have_the_schema_keys_and_defaults",),
        "RLSettings' defaults are the schema's",
    ),
    Mutation(
        "rl-prompt-answer-is-prompt",
        "sftpipe/rl_prompts.py",
        '"reference": row["completion"],',
        '"reference": row["prompt"],',
        (RL + "test_rl_prompts_are_the_training_rows_with_their_answers",),
        "each RL prompt carries its own reference answer",
    ),
    Mutation(
        "rl-prompts-from-test-split",
        "rules/rl.smk",
        "train=of_data(rules.tokenize_and_split.output.train),",
        "train=of_data(rules.tokenize_and_split.output.test),",
        (RL + "test_held_out_rows_never_reach_the_rl_prompts_in_the_workflow",),
        "held-out rows never reach the RL prompts",
    ),
    Mutation(
        "rl-beta-ignored",
        "sftpipe/grpo.py",
        "beta=rl.beta,",
        "beta=0.0,",
        (RL + "test_the_kl_term_is_there_exactly_when_beta_is_positive",),
        "the KL term to the start model when beta > 0",
    ),
    Mutation(
        "rl-generation-without-adapter",
        "sftpipe/grpo.py",
        "layer.scaling = module.scaling[adapter]",
        "layer.scaling = 0.0",
        (RL + "test_the_sampling_copy_is_the_policy",),
        "sampling from the policy (the frozen weights and the adapter's current factors), not from the start model",
    ),
    Mutation(
        "rl-generation-adapter-folded-in-bf16",
        "sftpipe/grpo.py",
        "return base + linear(linear(x, self.down), self.up) * self.scaling",
        "return linear(x, (self.weight.float() + self.scaling * self.up.float() @ self.down.float()).to(base.dtype))",
        (RL + "test_the_sampling_copy_is_the_policy",),
        "the sampling copy keeps a bf16 policy's small updates (folded into bf16 weights, most of them round away)",
    ),
    Mutation(
        "rl-prefill-wrong-mask",
        "sftpipe/grpo.py",
        "firsts = torch.cumsum(counts, 0) - counts",
        "firsts = torch.arange(len(counts))",
        (RL + "test_each_group_prompt_is_prefilled_once",),
        "each group's prompt prefilled once under its own attention mask",
    ),
    Mutation(
        "rl-report-without-significance",
        "sftpipe/report.py",
        'paired += significance(predictions, harness, "tuned", "rl")',
        "paired += []",
        (RL + "test_the_report_sets_sft_and_rl_side_by_side",),
        "the report's paired significance of RL against the SFT model it started from",
    ),
    Mutation(
        "rl-vllm-unchecked",
        "sftpipe/grpo.py",
        'if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:',
        "if False:",
        (RL + "test_vllm_generation_without_cuda_is_an_error_naming_the_key",),
        "vLLM generation refused, naming rl.use_vllm, where CUDA or vllm is missing",
    ),
    Mutation(
        "rl-sft-adapter-frozen",
        "sftpipe/grpo.py",
        "is_trainable=True",
        "is_trainable=False",
        (RL + "test_rl_keeps_training_the_sft_adapter_and_samples_from_it",),
        "rl.start: adapter keeps training the SFT adapter (and samples from it)",
    ),
    Mutation(
        "rl-resume-from-scratch",
        "sftpipe/train.py",
        "trainer.train(resume_from_checkpoint=str(resume) if resume else None)",
        "trainer.train(resume_from_checkpoint=None)",
        (RL + "test_sigkill_then_rerun_resumes_from_the_last_checkpoint",),
        "resuming a killed RL run from its checkpoint",
    ),
    Mutation(
        "rl-reward-file-not-an-input",
        "rules/rl.smk",
        "        rewards=rl_reward_files,\n",
        "",
        (RL + "test_editing_the_user_reward_reruns_rl_and_nothing_before_it",),
        "the user's reward file in RL's cache key",
    ),
    Mutation(
        "rl-sweep-trains-sft-each",
        "sftpipe/experiments.py",
        "return self.preference is not None or self.rl is not None",
        "return self.preference is not None",
        (RL + "test_a_sweep_over_rl_keys_trains_one_sft",),
        "a sweep over rl keys shares one SFT",
    ),
    Mutation(
        "rl-after-preference-from-sft",
        "rules/common.smk",
        "return preference_start(wildcards) if adapter else of_preference(rules.merge_preference_adapter.output[0])(wildcards)",
        "return experiment_base_model(wildcards) if adapter else of_sft(rules.merge_adapter.output[0])(wildcards)",
        (RL + "test_rl_after_preference_tuning_starts_from_the_preference_model_tuned_once",),
        "RL after preference tuning starts from the preference-tuned model",
    ),
    Mutation(
        "rl-after-preference-trains-sft-adapter",
        "rules/common.smk",
        'return {"sft_adapter": of_preference(rules.train_preference.output.adapter)(wildcards)}',
        'return {"sft_adapter": of_sft(rules.train_lora.output.adapter)(wildcards)}',
        (RL + "test_rl_after_preference_tuning_starts_from_the_preference_model_tuned_once",),
        "rl.start: adapter after preference tuning trains the preference adapter on",
    ),
    Mutation(
        "rl-sweep-tunes-preference-each",
        "rules/common.smk",
        '"preference": lambda e: e.preference_owner, "rl"',
        '"preference": lambda e: e.name, "rl"',
        (RL + "test_rl_after_preference_tuning_starts_from_the_preference_model_tuned_once",),
        "a sweep over rl keys after the same preference tuning tunes on preferences once",
    ),
    Mutation(
        "rl-loss-prompts-per-row",
        "sftpipe/grpo.py",
        "shared = self.share_prompts and not args and _text_only(kwargs)",
        "shared = False",
        (RL + "test_the_loss_computes_each_prompt_once_and_matches_trl",),
        "RL's loss computes each group's prompt once",
    ),
    Mutation(
        "rl-loss-prompt-cache-in-group-order",
        "sftpipe/grpo.py",
        "cache.batch_select_indices(inverse)",
        "cache.batch_repeat_interleave(len(input_ids) // len(prompts))",
        (RL + "test_the_loss_computes_each_prompt_once_and_matches_trl",),
        "each row of a shuffled batch attends to its own prompt's keys and values",
    ),
    Mutation(
        "rl-loss-prompt-without-gradient",
        "sftpipe/grpo.py",
        "        model(\n            input_ids=prompts[:, :-1],",
        "        torch.no_grad()(model)(\n            input_ids=prompts[:, :-1],",
        (RL + "test_the_loss_computes_each_prompt_once_and_matches_trl",),
        "the loss's gradient flows through the shared prompts' keys and values",
    ),
    Mutation(
        "rl-estimate-every-row-prompt",
        "sftpipe/resources.py",
        "if execution.world_size == 1:",
        "if False:",
        ("tests/test_resources.py::test_an_rl_job_in_one_process_counts_each_prompt_once",),
        "an RL job in one process asks for the memory of each prompt once",
    ),
    Mutation(
        "cpu-attention-through-sdpa",
        "sftpipe/attention.py",
        'if not torch.cuda.is_available():\n            return "varlen_eager"',
        'if not torch.cuda.is_available():\n            return "varlen_sdpa"',
        (S + "test_the_training_loss_runs_through_the_fused_pieces",),
        "train.attention auto attends eagerly, example by example, on CPU",
    ),
    Mutation(
        "eager-attention-without-causal-mask",
        "sftpipe/attention.py",
        "        scores = torch.baddbmm(bias, stacked,",
        "        scores = torch.baddbmm(bias * 0, stacked,",
        tuple(S + f"test_eager_per_example_attention_gives_sdpas_outputs_and_gradients[{p}]" for p in ("fp32", "bf16")),
        "eager attention is causal",
    ),
    Mutation(
        "eager-attention-default-scale",
        "sftpipe/attention.py",
        "    scale = scaling if scaling is not None else 1 / math.sqrt(width)",
        "    scale = 1 / math.sqrt(width)",
        tuple(S + f"test_eager_per_example_attention_gives_sdpas_outputs_and_gradients[{p}]" for p in ("fp32", "bf16")),
        "eager attention scales the scores as the model asks",
    ),
    Mutation(
        "eager-attention-for-long-examples",
        "sftpipe/attention.py",
        "    if length > EAGER_MAX_LENGTH:\n        return _sdpa_causal(q, k, v, dropout, scaling)",
        "    if False:\n        return _sdpa_causal(q, k, v, dropout, scaling)",
        (S + "test_eager_per_example_attention_gives_sdpas_outputs_and_gradients",),
        "an example over EAGER_MAX_LENGTH takes sdpa, whose memory does not grow with its square",
    ),
    Mutation(
        "preference-held-out-path-as-characters",
        "scripts/filter_and_mix.py",
        'held_out_paths=[snakemake.input.held_out] if "held_out" in snakemake.input.keys() else [],',
        'held_out_paths=list(snakemake.input.get("held_out", [])),',
        (RL + "test_rl_keeps_training_the_preference_adapter_through_the_workflow",),
        "the preference pairs' filter reads its SFT's held-out rows as one file (through Snakemake)",
    ),
    Mutation(
        "preference-owner-each-experiment",
        "sftpipe/experiments.py",
        "owner = next(o.name for o in tuned if o.sft_owner == e.sft_owner and o.preference == e.preference)",
        "owner = e.name",
        (RL + "test_rl_after_preference_tuning_starts_from_the_preference_model_tuned_once",),
        "experiments that agree on SFT and preference tuning share the preference stages",
    ),
    Mutation(
        "rl-compared-with-sft-after-preference",
        "sftpipe/report.py",
        'if variant == "rl" and "preference" in variants:',
        "if False:",
        (RL + "test_the_report_sets_sft_and_rl_side_by_side",),
        "the report pairs RL with the model it started from (preference-tuned where there is one)",
    ),
    Mutation(
        "srun-without-overlap",
        "sftpipe/launch.py",
        '"srun", "--overlap", f"--nodes={execution.nodes}"',
        '"srun", f"--nodes={execution.nodes}"',
        N,
        "the training step shares the first node with the plugin's one-task jobstep (else it waits forever)",
    ),
    Mutation(
        "srun-one-task",
        "sftpipe/launch.py",
        'f"--ntasks={execution.nodes}", "--ntasks-per-node=1",',
        '"--ntasks=1",',
        N,
        "one torchrun agent on each node of the allocation",
    ),
    Mutation(
        "srun-under-the-jobsteps-limits",
        "sftpipe/launch.py",
        'return {k: v for k, v in env.items() if k in keep or not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}',
        "return env",
        N,
        "the srun over the allocation free of the one-node jobstep's SLURM_* limits",
    ),
    Mutation(
        "gpus-as-the-jobs-total",
        "sftpipe/execution.py",
        'return {"gpu": 0, "gres": f"gpu:{self.gpus}"}',
        'return {"gpu": self.gpus * self.nodes, "gres": f"gpu:{self.gpus}"}',
        N,
        "a several-node job asks for its GPUs per node, not as a total the one-node jobstep cannot hold",
    ),
    Mutation(
        "fixed-rendezvous-port",
        "sftpipe/launch.py",
        "return RENDEZVOUS_PORTS[int(job_id) % len(RENDEZVOUS_PORTS)]",
        "return 29500",
        (L + "test_each_job_meets_at_a_port_of_its_own",),
        "a rendezvous port per job, so that jobs sharing a first node do not collide",
    ),
    Mutation(
        "gpu-cap-unchecked",
        "rules/common.smk",
        "checked(workflow, check_execution_caps)",
        "pass",
        (L + "test_planning_a_job_over_the_slurm_profiles_gpu_cap_stops_in_one_line",),
        "a training job the profile's gpu cap would silently shrink stops the plan, naming train.gpus",
    ),
    Mutation(
        "namespaces-left-behind",
        "cluster/local-slurm.sh",
        """    remove_etc_link
    namespaced && net_down
""",
        """    remove_etc_link
""",
        N,
        "stopping the two-node SLURM removes its namespaces, veths and bridge",
    ),
    Mutation(
        "glibc-sized-as-tcmalloc",
        "sftpipe/resources.py",
        'ALLOCATOR_OVERHEAD = {"tcmalloc": 1.0, "jemalloc": 1.5, "system": 1.5}',
        'ALLOCATOR_OVERHEAD = {"tcmalloc": 1.0, "jemalloc": 1.0, "system": 1.0}',
        ("tests/test_resources.py::test_the_demo_training_job_asks_for_more_than_it_used",),
        "a job on glibc's malloc asks for the memory glibc's holes add",
    ),
    Mutation(
        "rmsnorm-keeps-fp32-copy",
        "sftpipe/rmsnorm.py",
        "        ctx.save_for_backward(x, weight, scale)",
        "        ctx.save_for_backward(upcast, weight, scale)",
        (S + "test_the_fused_rmsnorm_keeps_no_fp32_copy_of_the_hidden_states",),
        "the fused RMSNorm keeps its input in the training precision, not an fp32 copy",
    ),
    Mutation(
        "rmsnorm-scaled-in-the-input-precision",
        "sftpipe/rmsnorm.py",
        "    return torch.mul(upcast, scale, out=torch.empty(upcast.shape, dtype=dtype, device=upcast.device))",
        "    return torch.mul(upcast.to(dtype), scale.to(dtype))",
        (S + "test_fused_rmsnorm_and_rope_give_the_stock_outputs_and_gradients",),
        "the fused RMSNorm rounds the fp32 product into the training precision in one pass, bit for bit the stock norm",
    ),
    Mutation(
        "rmsnorm-backward-wrong",
        "sftpipe/rmsnorm.py",
        "        grad_mean = -0.5 * grad_scale * scale.pow(3)",
        "        grad_mean = -0.5 * grad_scale * scale.pow(2)",
        (S + "test_fused_rmsnorm_and_rope_give_the_stock_outputs_and_gradients",),
        "the fused RMSNorm's gradient is the stock one",
    ),
    Mutation(
        "rope-backward-unrotated-the-wrong-way",
        "sftpipe/rotary.py",
        "        return grad * cos + _unrotate_half(grad * sin), None, None",
        "        return grad * cos + _rotate_half(grad * sin), None, None",
        (S + "test_fused_rmsnorm_and_rope_give_the_stock_outputs_and_gradients",),
        "the fused RoPE's gradient is the stock one",
    ),
    Mutation(
        "rope-not-patched",
        "sftpipe/rotary.py",
        "    modeling.apply_rotary_pos_emb = fused_rotary if fused else stock",
        "    modeling.apply_rotary_pos_emb = stock",
        (S + "test_the_training_loss_runs_through_the_fused_pieces",),
        "the training stage's loss runs through the fused RoPE",
    ),
    Mutation(
        "attention-sliced",
        "sftpipe/attention.py",
        "    parts = zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)",
        "    ends = cu_seq_lens_q.tolist()\n"
        "    parts = [tuple(t[:, :, a:b] for t in (query, key, value)) for a, b in zip(ends[:-1], ends[1:])]",
        (S + "test_the_training_loss_runs_through_the_fused_pieces",),
        "per-example attention splits the packed row (one concatenation in backward, no zero-filled slices)",
    ),
    Mutation(
        "lora-inputs-copied",
        "sftpipe/train.py",
        '        if settings.lean_lora and self.precision in ("bf16", "fp16"):',
        "        if False:",
        (S + "test_lora_layers_share_their_input_under_autocast",),
        "LoRA layers reading one input keep it once under autocast",
    ),
    Mutation(
        "lora-layers-not-fused",
        "sftpipe/train.py",
        "        if settings.fused_lora:",
        "        if False:",
        (S + "test_the_training_loss_runs_through_the_fused_pieces",),
        "the training stage's loss runs through one fused step per LoRA layer",
    ),
    Mutation(
        "fused-lora-input-gradient-without-low-rank",
        "sftpipe/lora_linear.py",
        "        grad_x = (grad @ weight).addmm_(grad_low_rank, a)",
        "        grad_x = grad @ weight",
        (S + "test_fused_lora_gives_peft_outputs_and_gradients",),
        "the fused LoRA layer's input gradient is peft's (the frozen and the low-rank paths)",
    ),
    Mutation(
        "fused-lora-b-gradient-unscaled",
        "sftpipe/lora_linear.py",
        "        grad_b = (grad.T @ low_rank).float().mul_(ctx.scaling)",
        "        grad_b = (grad.T @ low_rank).float()",
        (S + "test_fused_lora_gives_peft_outputs_and_gradients",),
        "the fused LoRA layer's gradient for B is peft's (scaled)",
    ),
    Mutation(
        "final-evaluation-run-twice",
        "sftpipe/train.py",
        "        return last[-1] if last and not trainer.args.load_best_model_at_end else trainer.evaluate()",
        "        return trainer.evaluate()",
        (T + "test_validation_runs_once_per_evaluation_step",),
        "training takes the Trainer's own evaluation at the last step instead of a second pass over the validation rows",
    ),
    Mutation(
        "bench-sftpipe-evaluates-while-training",
        "bench/train_throughput.py",
        '        work / "no-validation.jsonl",  # as TRL\'s variants',
        '        work / "heldout.jsonl",  # as TRL\'s variants',
        ("tests/test_readme.py::test_every_readme_command_runs[.venv/bin/python bench/train_throughput.py]",),
        "the training bench times sftpipe without evaluation while training, as TRL's variants (no eval set)",
    ),
    Mutation(
        "bench-rounds-always-in-one-order",
        "bench/train_throughput.py",
        "(variants if number % 2 == 0 else variants[::-1])",
        "variants",
        ("tests/test_bench.py::test_the_training_bench_trains_every_other_round_in_the_reverse_order",),
        "the training bench trains every other round in the reverse order, so no variant always follows the same one",
    ),
    Mutation(
        "fused-lora-input-gradient-always",
        "sftpipe/lora_linear.py",
        "        if not ctx.needs_input_grad[0]:",
        "        if False:",
        (S + "test_the_fused_lora_layer_computes_an_input_gradient_only_where_one_is_needed",),
        "the fused LoRA layer computes no input gradient where none is needed (the first layers' frozen input)",
    ),
    Mutation(
        "fused-lora-ignores-dropout",
        "sftpipe/lora_linear.py",
        "        and all(type(d) is torch.nn.Identity for d in layer.lora_dropout.values())\n",
        "",
        (S + "test_lora_layers_with_dropout_or_dora_keep_peft_forward",),
        "a LoRA layer with dropout keeps peft's forward (the fused one has none)",
    ),
    Mutation(
        "rl-job-sized-per-prompt",
        "sftpipe/resources.py",
        '    settings = {**train, "batch_size": rl["prompts_per_step"] * rl["num_generations"], "fused_loss": True}',
        '    settings = {**train, "batch_size": rl["prompts_per_step"], "fused_loss": True}',
        ("tests/test_resources.py::test_the_demo_rl_job_asks_for_more_than_it_used",),
        "an RL job asks for the memory of every completion of its step",
    ),
    Mutation(
        "rl-stage-untracked",
        "scripts/train_rl.py",
        "            report_to=parse_report_to(snakemake.resources.report_to),\n",
        "",
        (RL + "test_the_rl_stage_runs_on_tcmalloc_and_tracks_its_curves",),
        "the RL stage's curves go to the experiment's trackers (train.report_to)",
    ),
    Mutation(
        "rl-curves-not-reported",
        "sftpipe/train.py",
        'report_to=list(self.job.report_to) or "none",',
        'report_to="none",',
        (RL + "test_the_rl_curves_reach_the_trackers",),
        "the RL curves (each reward's mean, KL, lengths, zero-spread groups, clip ratios) reach the trackers",
    ),
    Mutation(
        "rl-job-in-the-stage-process",
        "scripts/train_rl.py",
        "Execution(allocator=snakemake.resources.allocator)",
        'Execution(allocator="system")',
        (RL + "test_the_rl_stage_runs_on_tcmalloc_and_tracks_its_curves",),
        "the RL job runs on the allocator train.allocator gives (tcmalloc for auto, where installed)",
    ),
    Mutation(
        "rl-launched-job-loses-rewards",
        "sftpipe/rl_settings.py",
        '"rl": RLSettings.from_config(fields["rl"])',
        '"rl": RLSettings.from_config({**fields["rl"], "rewards": [{"kind": "exact"}]})',
        (RL + "test_a_launched_rl_job_runs_as_given_on_the_allocator",),
        "a launched RL process runs the job as given (its rewards, not the defaults)",
    ),
    Mutation(
        "stage-process-imports-torch",
        "sftpipe/jobs.py",
        "import json\n",
        "import json\n\nimport torch  # noqa: F401\n",
        ("tests/test_launch.py::test_a_training_stage_imports_no_torch_before_it_launches",),
        "a training stage's own process holds no torch while the training process it launched runs",
    ),
]


def scratch_copy(root: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored) under root/repo, staged in a git
    repository there, ../shared beside it."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout
    copy = root / "repo"
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    (root / "shared").symlink_to(REPO.parent / "shared")
    # A repository of its own, for the tests that list the working tree's files as git does.
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    return copy


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    # The copy's package first, also in the processes the tests start (torchrun, Snakemake), which
    # would otherwise import the installed (editable) one: the unmutated working tree.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(copy)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=copy,
        capture_output=True,
        text=True,
        env=env,
    )
    failures = [line for line in result.stdout.splitlines() if line.startswith(("E ", "FAILED"))]
    return result.returncode, "\n".join(failures[:3] + failures[-1:]) or result.stdout[-400:]


def run_mutation(mutation: Mutation, clean_runs: dict[tuple[str, ...], tuple[int, str]]) -> dict:
    """Mutate a scratch copy, run the mutation's tests on it (unmutated first, once per set of tests)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = scratch_copy(Path(tmp))
        target = copy / mutation.file
        text = target.read_text()
        assert text.count(mutation.old) == 1, f"{mutation.name}: the snippet must occur once in {mutation.file}"
        start = time.monotonic()
        if mutation.tests not in clean_runs:
            clean_runs[mutation.tests] = run_tests(copy, mutation.tests)
        clean, clean_output = clean_runs[mutation.tests]
        target.write_text(text.replace(mutation.old, mutation.new))
        mutated, output = run_tests(copy, mutation.tests)
    return {
        **asdict(mutation),
        "date": time.strftime("%Y-%m-%d"),
        "passes_unmutated": clean == 0,
        "killed": clean == 0 and mutated != 0,
        "failure": output if clean == 0 else clean_output,
        "seconds": round(time.monotonic() - start),
    }


def write(out: Path, recorded: dict[str, dict]) -> None:
    """The results of the mutations still listed, in their order, each dated by its own run."""
    listed = [recorded[m.name] for m in MUTATIONS if m.name in recorded]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "mutations": listed}, indent=2) + "\n")


def current(mutation: Mutation, recorded: dict[str, dict]) -> bool:
    """Whether `recorded` holds this mutation, as it is defined now, killed."""
    result = recorded.get(mutation.name)
    return (
        result is not None
        and result["killed"]
        and all(result[k] == list(v) if isinstance(v, tuple) else result[k] == v for k, v in asdict(mutation).items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[m.name for m in MUTATIONS])
    parser.add_argument("--out", default="bench/results/mutations.json")
    parser.add_argument(
        "--update", action="store_true", help="keep the other mutations' results already in --out (each run on its own code)"
    )
    parser.add_argument(
        "--missing", action="store_true", help="with --update: run only the mutations --out does not hold, as defined now, killed"
    )
    args = parser.parse_args()
    out = Path(args.out)
    recorded = {r["name"]: r for r in json.loads(out.read_text())["mutations"]} if args.update and out.exists() else {}
    chosen = [m for m in MUTATIONS if (not args.only or m.name in args.only) and not (args.missing and current(m, recorded))]
    clean_runs: dict[tuple[str, ...], tuple[int, str]] = {}  # the unmutated tree passes or fails alike for each
    killed = []
    for mutation in chosen:
        recorded[mutation.name] = result = run_mutation(mutation, clean_runs)
        killed.append(result["killed"])
        write(out, recorded)  # after each: a long run interrupted keeps what it found
        print(f"{mutation.name}: {'killed' if result['killed'] else 'SURVIVED'} ({result['seconds']} s)", file=sys.stderr)
    if not all(killed):
        sys.exit(1)


if __name__ == "__main__":
    main()
