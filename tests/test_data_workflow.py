"""The data stages through Snakemake itself, to the tokenized data and never further: bad input fails
its own job with an error naming file:line or config key and leaves no artifact; two runs give
byte-identical data artifacts; the tokenized data is rebuilt when what it depends on changes, and
only then."""

import concurrent.futures
import copy
import functools
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import yaml
from conftest import GUANACO_ROWS, write_jsonl
from workflow import planned_jobs, snakemake, stray_files

from sftpipe.data import DatasetSpec

pytestmark = pytest.mark.slow

TOKENIZED = "results/data/tokenized/{experiment}/stats.json"


@pytest.fixture(scope="module")
def http_server(shared_data):
    """A local HTTP server on 127.0.0.1 serving ../shared/data."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shared_data))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- Bad input -------------------------------------------------------------------------------------

ALPACA_ROW = {"instruction": "Name a primary color.", "input": "", "output": "Red."}


def test_bad_input_through_snakemake(tmp_path, http_server):
    """One run with --keep-going, one dataset per bad-input case: each fails its own job, its log names
    file:line or the config key, and it leaves no artifact."""
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    good = json.dumps(ALPACA_ROW) + "\n"
    (fixtures / "malformed_json.jsonl").write_text(good + '{"instruction": "a", "output": \n' + good)
    write_jsonl(fixtures / "missing_field.jsonl", [ALPACA_ROW, {"instruction": "No answer here.", "input": ""}])
    write_jsonl(
        fixtures / "wrong_type.jsonl",
        [
            ALPACA_ROW,
            ALPACA_ROW | {"instruction": "Add 40 and 2."},
            {"instruction": "Six times seven?", "input": "", "output": 42},
        ],
    )
    (fixtures / "empty_file.jsonl").write_bytes(b"")
    write_jsonl(fixtures / "unknown_field.jsonl", [ALPACA_ROW])
    (fixtures / "non_utf8.jsonl").write_bytes(good.encode() + b'{"instruction": "Caf\xe9?", "input": "", "output": "Yes."}\n')
    # The prompt renders (Alpaca rows have `instruction`), the completion names a field they lack.
    user_template = {"prompt": "{{ instruction }}", "completion": "{{ nope }}"}
    datasets = {
        **{
            name: {"preset": "alpaca", "path": f"fixtures/{name}.jsonl"}
            for name in ("malformed_json", "missing_field", "wrong_type", "empty_file", "non_utf8")
        },
        "unknown_field": {"format": "alpaca", "template": user_template, "path": "fixtures/unknown_field.jsonl"},
        "sha_mismatch": {
            "preset": "alpaca",
            "url": f"{http_server}/lamini_docs/lamini_docs.jsonl",
            "sha256": "0" * 64,
            "limit": 5,
        },
    }
    config = {"experiment": "bad", "base_model": {"name": "tiny", "source": "tiny-random"}, "datasets": datasets}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))

    targets = [
        f"results/data/hydrated/{DatasetSpec.from_config(name, cfg).renderer('tiny')}/{name}.jsonl"
        for name, cfg in datasets.items()
    ]
    result = snakemake(tmp_path, *targets, "--keep-going", "--cores", "2", "--configfile", "bad.yaml", check=False)
    assert result.returncode != 0

    # What each failure must name: the file and line, or the config key (and the field).
    expected = {
        "malformed_json": [r"fixtures/malformed_json\.jsonl:2:32: malformed JSON"],
        "missing_field": [r"missing_field\.jsonl:2\b", r"missing field 'output'"],
        "wrong_type": [r"wrong_type\.jsonl:3\b", r"field 'output' must be a string, got int"],
        "empty_file": [r"fixtures/empty_file\.jsonl", r"no rows"],
        "non_utf8": [r"fixtures/non_utf8\.jsonl:2: not valid UTF-8"],
        "unknown_field": [r"unknown_field\.jsonl:1\b", r"datasets\.unknown_field\.template\.completion", r"'nope' is undefined"],
        "sha_mismatch": [r"datasets\.sha_mismatch\.sha256", r"lamini_docs\.jsonl has sha256 [0-9a-f]{64}"],
    }
    results = tmp_path / "results"
    failed_at = {}
    for name, patterns in expected.items():
        logs = {
            stage: path.read_text() if path.exists() else ""
            for stage, path in (
                ("download", results / "logs" / "download_dataset" / f"{name}.log"),
                *(("hydrate", path) for path in (results / "logs" / "hydrate_dataset").glob(f"*/{name}.log")),
            )
        }
        [stage] = [stage for stage, text in logs.items() if " ERROR " in text] or [None]
        assert stage, f"{name}: no rule log holds an error:\n{logs}"
        for pattern in patterns:
            assert re.search(pattern, logs[stage]), f"{name}: {pattern!r} not in the {stage} log:\n{logs[stage]}"
        failed_at[name] = stage
        # No artifact of the stage that failed (or of any later one).
        assert not list((results / "data" / "hydrated").glob(f"*/{name}.jsonl")), name
        if stage == "download":
            assert not list((results / "data" / "raw").glob(f"{name}.*")), name
    # Where each case is caught today: reading a file at download, its rows' fields at hydrate.
    assert {n for n, s in failed_at.items() if s == "download"} >= {"malformed_json", "empty_file", "non_utf8", "sha_mismatch"}
    assert failed_at["unknown_field"] == "hydrate"
    assert not stray_files(results / "data"), stray_files(results / "data")


# --- Determinism and rebuilds ------------------------------------------------------------------------

ARC_QUESTION = (
    "An astronomer observes that a planet rotates faster after a meteorite impact. "
    "Which is the most likely effect of this increase in rotation?"
)
CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Translate 'thank you' into Spanish."},
            {"role": "assistant", "content": "Gracias."},
        ]
    },
    # An ARC-Challenge test question planted in training data: decontamination must remove it.
    {
        "messages": [
            {"role": "user", "content": ARC_QUESTION},
            {"role": "assistant", "content": "Planetary days will become shorter."},
        ]
    },
]
LAMINI_TEMPLATE = {"prompt": "### Question:\n{{ question }}\n\n### Answer:", "completion": "{{ answer }}"}
LAMINI_RENDERER = DatasetSpec.from_config("lamini", {"format": "qa", "template": LAMINI_TEMPLATE, "path": "x"}).renderer("tiny")


def data_config(work: Path, shared_data: Path, base_model: Path) -> Path:
    """Real Alpaca (a local path), Guanaco multi-turn and OpenAI `messages` fixtures, real Lamini docs
    under a user Jinja template, decontaminated against real ARC-Challenge; the base model is a local
    directory holding a saved tiny model and tokenizer."""
    shutil.copytree(base_model, work / "base-model")
    # Each Guanaco row three times: exact dedup removes the copies.
    write_jsonl(work / "fixtures" / "guanaco.jsonl", GUANACO_ROWS * 3)
    write_jsonl(work / "fixtures" / "chat.jsonl", CHAT_ROWS)
    arc_test = shared_data / "arc" / "hf_schema" / "ARC-Challenge-test.jsonl"
    config = {
        "experiment": "det",
        "base_model": {"name": "tiny", "source": "base-model"},
        "datasets": {
            "alpaca": {"preset": "alpaca", "path": str(shared_data / "alpaca" / "alpaca_5000.json"), "limit": 200},
            "guanaco": {"preset": "guanaco", "path": "fixtures/guanaco.jsonl"},
            "chat": {"format": "messages", "template": "chat", "path": "fixtures/chat.jsonl"},
            "lamini": {
                "format": "qa",
                "template": LAMINI_TEMPLATE,
                "path": str(shared_data / "lamini_docs" / "lamini_docs.jsonl"),
                "limit": 40,
            },
        },
        "data": {"max_length": 128, "split": {"validation_fraction": 0.1, "test_fraction": 0.1}},
        "eval": {"lm_eval": {"tasks": [{"name": "arc_challenge", "data_files": {"test": str(arc_test)}}]}},
    }
    path = work / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, shared_data, tiny_model) -> tuple[Path, Path]:
    """The same config run to the tokenized data in two work directories, as two concurrent Snakemake processes."""
    works = [tmp_path_factory.mktemp(f"data-run-{run}") for run in "ab"]
    for work in works:
        data_config(work, shared_data, tiny_model)
    target = TOKENIZED.format(experiment="det")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda work: snakemake(work, target, "--cores", "2", "--configfile", "data.yaml"), works))
    return works[0], works[1]


def test_data_artifacts_are_byte_identical_across_runs(two_runs):
    a, b = two_runs
    assert (a / "data.yaml").read_bytes() == (b / "data.yaml").read_bytes()
    data = Path("results") / "data"
    artifacts = [
        *(data / "raw" / f"{name}.jsonl" for name in ("alpaca", "guanaco", "chat", "lamini")),
        data / "hydrated" / "alpaca" / "alpaca.jsonl",
        data / "hydrated" / "guanaco" / "guanaco.jsonl",
        data / "hydrated" / LAMINI_RENDERER / "lamini.jsonl",  # the config's own Jinja template
        data / "hydrated" / "chat-tiny" / "chat.jsonl",  # rendered by the base model's chat template
        data / "mixed" / "det.jsonl",
        data / "mixed" / "det.removed.jsonl",
        *(data / "tokenized" / "det" / f"{split}.jsonl" for split in ("train", "validation", "test")),
    ]
    for artifact in artifacts:
        content = (a / artifact).read_bytes()
        assert content, artifact
        assert content == (b / artifact).read_bytes(), artifact
    fingerprints = [json.loads((work / data / "tokenized" / "det" / "stats.json").read_text())["fingerprint"] for work in (a, b)]
    assert fingerprints[0] == fingerprints[1] and re.fullmatch(r"[0-9a-f]{64}", fingerprints[0])
    # The comparison covers real filtering: copies removed, the planted ARC question decontaminated.
    removed = [json.loads(line) for line in (a / data / "mixed" / "det.removed.jsonl").read_text().splitlines()]
    reasons = {r["reason"] for r in removed}
    assert {"exact_duplicate", "eval_contamination"} <= reasons, reasons
    assert any(r["reason"] == "eval_contamination" and ARC_QUESTION in r["prompt"] for r in removed)
    hydrated_chat = [json.loads(line) for line in (a / data / "hydrated" / "chat-tiny" / "chat.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in hydrated_chat] == ["Paris.", "Rome.", "Gracias.", "Planetary days will become shorter."]


def test_tokenized_data_rebuilds_when_its_inputs_change(two_runs):
    """Dry runs after one real run: each change plans `tokenize_and_split`, an unrelated one does not.
    (A code change is not exercised here: it would mean editing the repository's sftpipe/ under test.
    The `code()` inputs in rules/*.smk cover it, tests/test_envs.py checks they are complete, and
    tests/test_tokenization.py checks that the fingerprint follows the code.)"""
    work, _ = two_runs
    target = TOKENIZED.format(experiment="det")
    base = yaml.safe_load((work / "data.yaml").read_text())
    assert planned_jobs(work, work / "data.yaml", target) == {}

    def changed(name, edit) -> dict[str, int]:
        config = copy.deepcopy(base)
        edit(config)
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return planned_jobs(work, path, target)

    # (a) a data setting
    jobs = changed("max-length", lambda c: c["data"].update(max_length=96))
    assert "tokenize_and_split" in jobs, jobs
    assert not {"download_dataset", "hydrate_dataset", "materialize_base_model"} & set(jobs), jobs

    # (b) the text of a dataset's user Jinja template
    def edit_template(config):
        config["datasets"]["lamini"]["template"]["prompt"] = "Question: {{ question }}\nAnswer:"

    jobs = changed("template", edit_template)
    assert jobs.get("hydrate_dataset") == 1 and "tokenize_and_split" in jobs, jobs
    assert "download_dataset" not in jobs, jobs  # the template is not the download's business

    # (c) a mixing weight: the mixture and what follows, no download, no hydration
    jobs = changed("weight", lambda c: c["datasets"]["alpaca"].update(weight=0.5))
    assert "filter_and_mix" in jobs and "tokenize_and_split" in jobs, jobs
    assert not {"download_dataset", "hydrate_dataset"} & set(jobs), jobs

    # (e) an unrelated setting plans no data job at all
    assert changed("learning-rate", lambda c: c.setdefault("train", {}).update(learning_rate=0.001)) == {}

    # (f) a mirror: no dataset here reads the Hub, so none downloads again
    assert changed("mirror", lambda c: c["data"].update(mirror_dir="mirror")) == {}

    # (d) the base model's tokenizer, edited in its local source directory
    tokenizer_config = work / "base-model" / "tokenizer_config.json"
    original, times = tokenizer_config.read_bytes(), os.stat(tokenizer_config)
    settings = json.loads(original)
    settings["model_max_length"] = 4096
    try:
        tokenizer_config.write_text(json.dumps(settings, indent=2))
        jobs = planned_jobs(work, work / "data.yaml", target)
        assert "materialize_base_model" in jobs and "tokenize_and_split" in jobs, (
            f"editing {tokenizer_config} planned {jobs or 'nothing'}"
        )
    finally:
        tokenizer_config.write_bytes(original)
        os.utime(tokenizer_config, ns=(times.st_atime_ns, times.st_mtime_ns))


def test_switching_a_template_back_finds_the_earlier_rendering(two_runs):
    """Rows hydrated under each template keep their own file: switching back renders nothing again."""
    _, work = two_runs
    target = TOKENIZED.format(experiment="det")
    config = yaml.safe_load((work / "data.yaml").read_text())
    config["datasets"]["guanaco"]["template"] = "chatml"
    (work / "chatml.yaml").write_text(yaml.safe_dump(config))
    snakemake(work, target, "--cores", "2", "--configfile", "chatml.yaml")
    assert (work / "results" / "data" / "hydrated" / "chatml" / "guanaco.jsonl").exists()
    jobs = planned_jobs(work, work / "data.yaml", target)
    assert "hydrate_dataset" not in jobs and "filter_and_mix" in jobs, jobs


# --- Evaluation data and interrupted stages ---------------------------------------------------------


def _arc_mirror(work: Path, shared_data: Path, broken_line: int | None = None) -> Path:
    """ARC-Easy's test split in a mirror (the first 40 rows), with one answer key that names no choice."""
    rows = [json.loads(line) for line in (shared_data / "arc" / "hf_schema" / "ARC-Easy-test.jsonl").open()][:40]
    if broken_line is not None:
        rows[broken_line - 1]["answerKey"] = "Z"
    return write_jsonl(work / "mirror" / "allenai" / "ai2_arc" / "ARC-Easy" / "test.jsonl", rows)


def test_a_fixed_mirror_file_prepares_the_eval_data_again(tmp_path, shared_data):
    mirrored = _arc_mirror(tmp_path, shared_data, broken_line=7)
    config = {
        "experiment": "eval-data",
        "base_model": {"name": "tiny", "source": "tiny-random"},
        "datasets": {"demo": {"preset": "sftpipe_demo", "limit": 40}},
        "data": {"mirror_dir": "mirror"},
        "eval": {"lm_eval": {"tasks": [{"name": "arc_easy"}]}},
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    target = "results/data/lm_eval/arc_easy"
    failed = snakemake(tmp_path, target, "--cores", "1", "--configfile", "eval.yaml", check=False)
    assert failed.returncode != 0
    message = f"{mirrored.relative_to(tmp_path)}:7: lm-eval task 'arc_easy': the task cannot read the row"
    assert message in failed.stdout + failed.stderr and "'Z' is not in list" in failed.stdout + failed.stderr
    assert message in (tmp_path / "results" / "logs" / "prepare_eval_data" / "arc_easy.log").read_text()
    assert not (tmp_path / target).exists() and not stray_files(tmp_path / "results")

    _arc_mirror(tmp_path, shared_data)  # the user fixes the file
    assert planned_jobs(tmp_path, tmp_path / "eval.yaml", target) == {"prepare_eval_data": 1}
    snakemake(tmp_path, target, "--cores", "1", "--configfile", "eval.yaml")
    assert json.loads((tmp_path / target / "manifest.json").read_text())["splits"]["test"]["kind"] == "mirror"
    assert planned_jobs(tmp_path, tmp_path / "eval.yaml", target) == {}
    # A later edit of the mirror file prepares the data again: the file is an input of the rule.
    _arc_mirror(tmp_path, shared_data, broken_line=3)
    assert planned_jobs(tmp_path, tmp_path / "eval.yaml", target) == {"prepare_eval_data": 1}


def test_a_stage_killed_mid_write_leaves_nothing_after_the_rerun(tmp_path, shared_data, tiny_model):
    import signal
    import subprocess
    import time

    from workflow import SNAKEMAKE

    shutil.copytree(tiny_model, tmp_path / "base-model")
    config = {
        "experiment": "killed",
        "base_model": {"name": "tiny", "source": "base-model"},
        "datasets": {"alpaca": {"preset": "alpaca", "path": str(shared_data / "alpaca" / "alpaca_5000.json")}},
        "data": {"filters": {"near_dedup": False, "decontaminate": False}},
    }
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(config))
    target = TOKENIZED.format(experiment="killed")
    tokenized = tmp_path / "results" / "data" / "tokenized" / "killed"
    command = [*SNAKEMAKE, "-d", str(tmp_path), target, "--cores", "1", "--configfile", "killed.yaml"]
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(tokenized.glob(".*.tmp-*")):
        assert run.poll() is None and time.monotonic() < deadline, "the tokenize stage ended before it could be killed"
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)  # Snakemake and the job, as a machine or a scheduler would
    run.wait()
    assert stray_files(tokenized), "the kill left no temporary file: nothing to clean"
    # What the user then runs: Snakemake's lock goes first (its message says so), then the rerun.
    snakemake(tmp_path, "--unlock", "--configfile", "killed.yaml")
    snakemake(tmp_path, target, "--cores", "1", "--configfile", "killed.yaml")
    assert not stray_files(tmp_path / "results"), stray_files(tmp_path / "results")
    assert json.loads((tokenized / "stats.json").read_text())["train"]["rows"] > 0
