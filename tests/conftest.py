import os
from pathlib import Path

import pytest

# Every test runs as an air-gapped user would: the Hub is unreachable.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# What the suite needs from outside the repo may be missing only where the user says so: a missing
# ../shared/data, SLURM or allocator fails its tests unless SFTPIPE_ALLOW_SKIPS=1 turns that into a
# skip. CUDA-only tests skip on machines without CUDA, which CI never has.
ALLOW_SKIPS = os.environ.get("SFTPIPE_ALLOW_SKIPS") == "1"


def unavailable(what: str) -> None:
    """Fail (or, with SFTPIPE_ALLOW_SKIPS=1, skip) a test whose prerequisite `what` is missing."""
    if ALLOW_SKIPS:
        pytest.skip(what)
    pytest.fail(f"{what} (set SFTPIPE_ALLOW_SKIPS=1 to skip the tests that need it)", pytrace=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "alpaca" / "alpaca_5000.json").exists():
        unavailable(f"{SHARED_DATA} (the real data samples) is not present")
    return SHARED_DATA


def _llama_cpp_missing() -> str | None:
    """Why llama.cpp's Python binding cannot be imported here, or None where it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as error:
        return (
            f"needs llama-cpp-python, which is not importable ({error}); it is an optional extra that compiles "
            "llama.cpp (pip install -e '.[gguf]', about 20 minutes on 2 cores)"
        )
    return None


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where CUDA is (`make gpu-check` runs them all) and skip elsewhere; tests
    marked `llama_cpp` run where llama-cpp-python is installed and skip, saying why, elsewhere."""
    import torch

    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    if any(item.get_closest_marker("llama_cpp") for item in items) and (reason := _llama_cpp_missing()):
        for item in items:
            if item.get_closest_marker("llama_cpp"):
                item.add_marker(pytest.mark.skip(reason=reason))


# What `train.precision: auto` resolves to depends on the CPU (bf16 where AVX512-BF16 or AMX is), so a
# test left at auto checks something different on each host. Every test that trains or scores pins its
# precision; the precision-sensitive ones take the `precision` fixture and run in both. A test about
# `auto` itself is marked `host_precision`.
PRECISIONS = ("fp32", "bf16")


@pytest.fixture(autouse=True)
def precision_is_pinned(request, monkeypatch):
    """Fail a test whose training or scoring would resolve `auto` from the host it runs on."""
    if request.node.get_closest_marker("host_precision"):
        return

    def host_precision():
        pytest.fail("a test left train.precision at 'auto': pin it (fp32, or the `precision` fixture for both)", pytrace=False)

    monkeypatch.setattr("sftpipe.precision.host_precision", host_precision)


@pytest.fixture(params=PRECISIONS)
def precision(request) -> str:
    """A precision-sensitive test runs in fp32 and in bf16 on every host (bf16 is emulated, slowly, where
    the CPU lacks it; the tiny model affords that)."""
    return request.param


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny-random Llama with the SmolLM2 tokenizer, materialized once per session."""
    from sftpipe.model import ModelSource, materialize_base_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    materialize_base_model(ModelSource("tiny-random"), out)
    return out


GUANACO_ROWS = [
    {"text": "### Human: What is the boiling point of water at sea level?### Assistant: It boils at 100 degrees Celsius."},
    {
        "text": "### Human: Name a primary color.### Assistant: Red is a primary color.### Human: "
        "Name another one.### Assistant: Blue is another primary color."
    },
]

DOLPHIN_ROWS = [
    {
        "instruction": "You are an AI assistant. You will be given a task. You must generate a detailed answer.",
        "input": "Translate to French: Good morning.",
        "output": "Bonjour.",
    },
    {
        "instruction": "You are a helpful assistant who answers briefly.",
        "input": "What is two plus two?",
        "output": "Four.",
    },
]


def prepared(spec, out: Path):
    """`spec` (a TaskSpec naming the user's `data_files`) with its data prepared, as the pipeline's
    `prepare_eval_data` rule does, under `out`."""
    from dataclasses import replace

    from sftpipe.tasks import prepare_task_data

    prepare_task_data(spec, out)
    return replace(spec, data_dir=str(out))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sweep_run(tmp_path_factory, shared_data) -> tuple[Path, str]:
    """The smoke sweep run locally with `--cores 2 --resources gpu=1`: its directory and Snakemake's job log."""
    from workflow import smoke_config, snakemake

    work = tmp_path_factory.mktemp("pipeline")
    smoke_config(work, shared_data)
    # Snakemake reports its job list on stderr.
    return work, snakemake(work, "--cores", "2", "--resources", "gpu=1", "--configfile", "smoke.yaml").stderr


def job(model, tokenized, out, settings, adapter="adapter", history="h.json"):
    """A training run on the `tokenized` fixture, writing under `out`."""
    from sftpipe.train import TrainJob

    return TrainJob(model, tokenized["train"], tokenized["validation"], out / adapter, out / history, out / "work", settings)


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory, tiny_model):
    """Tokenized splits of 48 short rows, for training on the tiny model."""
    from sftpipe.splits import SplitSettings
    from sftpipe.tokenization import SPLITS, LengthSettings, tokenize_and_split

    out = tmp_path_factory.mktemp("tokenized")
    rows = [
        # Each prompt unique, so a row's tokens tell which row it is (the data-parallel test needs that).
        {"id": f"r{i}", "dataset": "t", "prompt": f"Repeat ({i}): {w}\n", "completion": f"{w} {w}"}
        for i, w in enumerate(["red", "green", "blue", "cyan", "gold", "gray", "pink", "teal"] * 6)
    ]
    hydrated = write_jsonl(out / "h.jsonl", rows)
    paths = {s: out / f"{s}.jsonl" for s in SPLITS}
    tokenize_and_split([hydrated], tiny_model, paths, out / "stats.json", LengthSettings(32), SplitSettings(0.2, 0.1, 0))
    return paths


def killed_after_first_checkpoint(call: str, work: Path) -> int:
    """Run Python `call` in a process of its own, SIGKILL it once a checkpoint under `work` is complete,
    and return the newest complete checkpoint's step."""
    import os
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-c", call], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while not list(work.glob("*/checkpoint-*/trainer_state.json")):
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return max(int(p.parent.name.split("-")[1]) for p in work.glob("*/checkpoint-*/trainer_state.json"))


def tensorboard_scalars(log_dir) -> dict[str, list[float]]:
    """Each scalar's values in a TensorBoard log directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


ALLOCATOR_PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}


@pytest.fixture(scope="module")
def allocators():
    """tcmalloc and jemalloc, installed from Debian's packages where this machine can (root, apt)."""
    import shutil
    import subprocess

    from sftpipe.execution import planned_allocator
    from sftpipe.io import PipelineError

    def installed():
        try:
            return all(planned_allocator(name)[2] for name in ALLOCATOR_PACKAGES)
        except PipelineError:
            return False

    if not installed() and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *ALLOCATOR_PACKAGES.values()], env=env, check=False)
    if not installed():
        unavailable(f"needs {' and '.join(ALLOCATOR_PACKAGES.values())} (Debian), which cannot be installed here")
