"""lm-eval tasks: their data prepared as local JSONL from the user's files or the mirror, every document
checked through the task's own functions, bad data and unknown names reported with file, line and key."""

import json

import pytest
from conftest import write_jsonl

from sftpipe.io import PipelineError, read_json, read_jsonl
from sftpipe.tasks import MANIFEST, TaskSpec, prepare_task_data, task_config, task_manager


@pytest.fixture(scope="module")
def full_index():
    return task_manager()


@pytest.mark.parametrize(("num_fewshot", "splits"), [(0, ["test"]), (5, ["test", "train"])])
def test_mirrored_arc_keeps_official_prompt_and_metrics(shared_data, tmp_path, num_fewshot, splits):
    mirror = tmp_path / "mirror" / "allenai" / "ai2_arc" / "ARC-Challenge"
    mirror.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (mirror / f"{split}.jsonl").symlink_to(shared_data / "arc" / "hf_schema" / f"ARC-Challenge-{split}.jsonl")
    spec = TaskSpec("arc_challenge", num_fewshot=num_fewshot, data_dir=str(tmp_path / "arc_challenge"))
    manifest = prepare_task_data(spec, spec.data_dir, str(tmp_path / "mirror"))
    # Only what lm-eval reads: the evaluation split, and the few-shot examples' split when few-shot.
    assert sorted(manifest["splits"]) == sorted(splits) and {s["kind"] for s in manifest["splits"].values()} == {"mirror"}
    assert read_json(tmp_path / "arc_challenge" / MANIFEST) == manifest
    original = [json.loads(line) for line in (mirror / "test.jsonl").open() if line.strip()]
    assert list(read_jsonl(tmp_path / "arc_challenge" / "test.jsonl")) == original
    assert manifest["splits"]["test"]["rows"] == len(original)
    assert manifest["documents_checked"] == len(original) + (1119 if num_fewshot else 0)
    local = task_config(task_manager(("arc_challenge",)), spec)
    assert local["dataset_path"] == "json"
    assert local["dataset_kwargs"] == {"data_files": {s: str(tmp_path / "arc_challenge" / f"{s}.jsonl") for s in sorted(splits)}}
    assert local["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert [m["metric"] for m in local["metric_list"]] == ["acc", "acc_norm"]
    assert local["test_split"] == "test" and local["training_split"] == ("train" if num_fewshot else None)


def test_named_tasks_index_only_their_own_directories(full_index):
    narrow = task_manager(("arc_easy", "hellaswag", "sftpipe_demo_mc"))
    assert len(narrow.task_index) < 20 < len(full_index.task_index)
    for name in ("arc_easy", "hellaswag", "sftpipe_demo_mc"):
        assert narrow.task_index[name].yaml_path == full_index.task_index[name].yaml_path
    # A tag names tasks defined elsewhere: the whole index.
    assert len(task_manager(("ai2_arc",)).task_index) == len(full_index.task_index)


def test_unknown_task_names_the_key_and_the_closest_tasks(tmp_path, shared_data):
    spec = TaskSpec("arc_esay", data_files={"test": str(shared_data / "arc" / "hf_schema" / "ARC-Easy-test.jsonl")})
    with pytest.raises(PipelineError, match=r"eval.lm_eval.tasks.*'arc_esay' is not an lm-eval task .*did you mean arc_easy"):
        prepare_task_data(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_data_file_is_named(tmp_path):
    with pytest.raises(PipelineError, match=r"missing.jsonl: file not found"):
        prepare_task_data(TaskSpec("arc_easy", data_files={"test": str(tmp_path / "missing.jsonl")}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _broken(rows, index, change):
    rows = [json.loads(json.dumps(r)) for r in rows]
    change(rows[index])
    return rows


@pytest.mark.parametrize(
    ("task", "source", "split", "change", "message"),
    [
        ("arc_easy", "arc/hf_schema/ARC-Easy-test.jsonl", "test", lambda r: r.update(answerKey="Z"), r"'Z' is not in list"),
        (
            "arc_easy",
            "arc/hf_schema/ARC-Easy-test.jsonl",
            "test",
            lambda r: r.pop("choices"),
            r"('None' has no attribute 'label'|'choices' is undefined)",
        ),
        (
            "hellaswag",
            "hellaswag/hellaswag_val_sample1000.jsonl",
            "validation",
            lambda r: r.update(label="7"),
            r"the answer index 7 is not among its 4 choices",
        ),
    ],
    ids=["arc answerKey not a label", "arc without choices", "hellaswag label out of range"],
)
# The first document too: lm-eval renders it while it builds the task, before any document is checked.
@pytest.mark.parametrize("index", [3, 0], ids=["a later row", "the first row"])
def test_a_document_the_task_cannot_read_names_task_file_line_and_value(
    tmp_path, shared_data, task, source, split, change, message, index
):
    rows = list(read_jsonl(shared_data / source))[:5]
    path = write_jsonl(tmp_path / f"{split}.jsonl", _broken(rows, index, change))
    with pytest.raises(PipelineError, match=rf"{path}:{index + 1}: lm-eval task '{task}': .*{message}") as raised:
        prepare_task_data(TaskSpec(task, data_files={split: str(path)}), tmp_path / "out")
    # The value at fault is shown with the document.
    assert json.dumps(_broken(rows, index, change)[index]["id" if task == "arc_easy" else "ind"]) in str(raised.value)
    assert not (tmp_path / "out").exists()
