"""What every Snakemake entry script shares: logging into the rule's log, thread count, clean errors."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from .io import PipelineError

T = TypeVar("T")


def _not_a_missing_optional_kernel(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def silence_library_noise() -> None:
    """Keep out of the logs what libraries print that says nothing about the run: peft asks for
    transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model (a FutureWarning),
    and bitsandbytes, imported on a CPU with AVX512-BF16, tries to fetch an optional kernel from the
    Hub and warns when it cannot (its own CPU code then runs, as it does everywhere else)."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_a_missing_optional_kernel)


def prepare_job_environment(workflow_dir: str, remote: bool) -> None:
    """The environment every job of the workflow inherits, set by the Snakefile.

    Jobs import the workflow's own sftpipe (the code their `code()` inputs declare) whatever the
    Python environment: the project's venv, a conda env (--sdm conda) or a cluster job. A job on a
    cluster's compute node (`remote`) reads what the download rules, local to the submitting host,
    fetched: compute nodes often have no internet, and a silent Hub fetch there would hang.
    """
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [workflow_dir, os.environ.get("PYTHONPATH")]))
    if remote:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def checked(workflow: Any, check: Callable[[], T]) -> T:
    """`check()`, run while Snakemake reads the workflow; a PipelineError (a config problem) stops it
    with the problem's message alone, one line per problem, and exit status 1. Under `--verbose`,
    Snakemake shows the traceback too."""
    try:
        return check()
    except PipelineError as err:
        if workflow.output_settings.verbose:
            raise
        print(err, file=sys.stderr)
        sys.exit(1)


def run_stage(smk: Any, stage: Callable[[], Any]) -> None:
    """Run `stage` with its output in the rule's `log:` file; a PipelineError exits 1 with its message."""
    log_path = smk.log[0] if smk.log else os.devnull
    # Line-buffered, so progress shows in the log while the stage runs.
    with open(log_path, "a", encoding="utf-8", buffering=1) as log_file:
        handler = logging.StreamHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
        silence_library_noise()
        # The mode the Hub client is in, which says nothing of whether the Hub can be reached.
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        hub = "offline mode (HF_HUB_OFFLINE)" if offline else "online mode (HF_HUB_OFFLINE unset)"
        logging.getLogger("sftpipe").info("rule %s, Hugging Face Hub client in %s", smk.rule, hub)
        # The stages that compute imported torch already; the report does not need it.
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(max(1, smk.threads))
        try:
            with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
                stage()
        except PipelineError as err:
            message = name_experiment_keys(str(err), smk.config, getattr(smk.wildcards, "experiment", None))
            logging.getLogger("sftpipe").error("%s", message)
            print(f"sftpipe error in rule {smk.rule}: {message}", file=sys.stderr)
            sys.exit(1)
        except Exception:
            # A bug or an input no check foresaw: the traceback belongs in the rule's log too.
            logging.getLogger("sftpipe").exception("unexpected error in rule %s", smk.rule)
            raise


def name_experiment_keys(message: str, config: dict[str, Any], experiment: str | None) -> str:
    """`message` with every `config key '<section>.<key>...'` that experiment `experiment` sets itself
    renamed to where it is set, `experiments.<experiment>.<section>.<key>...`: a stage sees the merged
    settings, the user edits the override."""
    override = (config.get("experiments") or {}).get(experiment) or {}

    def where(match: re.Match) -> str:
        section, key = match[1], match[2]
        return f"config key 'experiments.{experiment}.{section}.{key}" if key in (override.get(section) or {}) else match[0]

    return re.sub(r"config key '(\w+)\.(\w+)", where, message)
