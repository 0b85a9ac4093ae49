"""Filter-and-mix: dedup, near-dedup, decontamination against real ARC questions, mixing ratios."""

import json

import pytest
from conftest import prepared, write_jsonl

from sftpipe.filters import FilterSettings, filter_and_mix
from sftpipe.formats import TEMPLATES, Example
from sftpipe.io import read_jsonl
from sftpipe.mixing import copies, mix_plan
from sftpipe.splits import SplitSettings, row_split
from sftpipe.tasks import TaskSpec
from sftpipe.words import words


def _alpaca_rows(shared_data, n):
    raw = json.loads((shared_data / "alpaca" / "alpaca_5000.json").read_text())[:n]
    return [
        _alpaca_row(f"alpaca-{i}", r["instruction"] + (" " + r["input"] if r["input"] else ""), r["output"])
        for i, r in enumerate(raw)
    ]


def _alpaca_row(row_id, instruction, output):
    return {
        "id": row_id,
        "source_id": row_id,
        "dataset": "alpaca",
        "prompt": TEMPLATES["alpaca"](Example(instruction, ""), "", None)[0],
        "completion": output,
        "content": f"{instruction}\n{output}",
    }


DEFAULT_FILTERS = FilterSettings()


def _run(tmp_path, datasets, weights=None, settings=DEFAULT_FILTERS, tasks=None):
    paths = [write_jsonl(tmp_path / f"{name}.hydrated.jsonl", rows) for name, rows in datasets.items()]
    stats = filter_and_mix(
        paths,
        weights or {},
        tmp_path / "mixed.jsonl",
        tmp_path / "filters.json",
        tmp_path / "removed.jsonl",
        settings,
        SplitSettings(0.1, 0.1, 0),
        tasks or [],
    )
    return stats, list(read_jsonl(tmp_path / "mixed.jsonl")), list(read_jsonl(tmp_path / "removed.jsonl"))


def test_exact_and_near_duplicates_are_removed(tmp_path, shared_data):
    rows = _alpaca_rows(shared_data, 60)
    exact = {**rows[3], "id": "dup-exact", "source_id": "dup-exact", "content": rows[3]["content"].upper() + "  "}
    near = {**rows[5], "id": "dup-near", "source_id": "dup-near", "content": rows[5]["content"] + " Indeed."}
    settings = FilterSettings(decontaminate=False, near_dedup_threshold=0.7)
    stats, mixed, removed = _run(tmp_path, {"alpaca": rows + [exact, near]}, settings=settings)
    assert {r["id"]: (r["reason"], r["match"]) for r in removed} == {
        "dup-exact": ("exact_duplicate", "alpaca-3"),
        "dup-near": ("near_duplicate", "alpaca-5"),
    }
    assert [r["id"] for r in mixed] == [r["id"] for r in rows]
    assert stats["datasets"]["alpaca"]["exact_duplicate"] == 1 and stats["datasets"]["alpaca"]["near_duplicate"] == 1


def _random_text(rng, words):
    return " ".join(f"w{rng.randrange(100_000)}" for _ in range(words))


def _text_row(row_id, content):
    return {"id": row_id, "source_id": row_id, "dataset": "d", "prompt": "", "completion": content, "content": content}


def test_near_dedup_finds_pairs_above_the_threshold_and_keeps_those_below(tmp_path):
    """Forty pairs at word 5-shingle Jaccard ~0.9 (one word of 100 replaced) all go; forty at ~0.7
    (four words replaced) all stay: LSH banding alone at 0.85 finds about 80% of the first and
    comparing the MinHashes of candidates is what keeps the second."""
    import random

    from sftpipe.words import ngrams, words

    rng = random.Random(0)
    rows, close, far = [], [], []
    for i in range(80):
        tokens = _random_text(rng, 100).split()
        rows.append(_text_row(f"orig-{i}", " ".join(tokens)))
        for k in range(1 if i < 40 else 4):
            tokens[10 + 25 * k] = f"changed{i}x{k}"
        twin = _text_row(f"twin-{i}", " ".join(tokens))
        a, b = ngrams(words(rows[-1]["content"]), 5), ngrams(words(twin["content"]), 5)
        assert (0.9 <= len(a & b) / len(a | b) < 0.91) if i < 40 else (0.65 < len(a & b) / len(a | b) < 0.75)
        (close if i < 40 else far).append(twin)
    _, _, removed = _run(tmp_path, {"d": rows + close + far}, settings=FilterSettings(decontaminate=False))
    assert {r["id"]: r["match"] for r in removed} == {f"twin-{i}": f"orig-{i}" for i in range(40)}


def test_filters_write_the_same_bytes_with_any_number_of_workers(tmp_path, shared_data, monkeypatch):
    import sftpipe.filters

    monkeypatch.setattr(sftpipe.filters, "BATCH", 16)  # many batches, so the workers share the rows
    rows = _alpaca_rows(shared_data, 200)
    rows += [
        {**rows[i], "id": f"dup-{i}", "source_id": f"dup-{i}", "content": rows[i]["content"] + " Indeed."}
        for i in range(0, 200, 9)
    ]
    outputs = []
    for threads in (1, 3):
        out = tmp_path / f"threads{threads}"
        out.mkdir()
        path = write_jsonl(out / "d.jsonl", rows)
        filter_and_mix(
            [path],
            {},
            out / "m.jsonl",
            out / "s.json",
            out / "r.jsonl",
            FilterSettings(),
            SplitSettings(0.1, 0.1, 0),
            threads=threads,
        )
        outputs.append([(out / name).read_bytes() for name in ("m.jsonl", "s.json", "r.jsonl")])
    assert outputs[0] == outputs[1]
    assert outputs[0][2].count(b"near_duplicate") >= 20


def test_every_turn_of_a_conversation_survives_near_dedup(tmp_path):
    from sftpipe.data import DatasetSpec, hydrate_dataset

    answer = " ".join(f"Step {i}: mix the flour, the water and the salt, then knead for a minute." for i in range(12))
    conversation = {
        "text": f"### Human: How do I make bread dough?### Assistant: {answer}### Human: Thanks!### Assistant: Enjoy."
    }
    raw = write_jsonl(tmp_path / "raw.jsonl", [conversation])
    hydrate_dataset(DatasetSpec.from_config("guanaco", {"preset": "guanaco"}), raw, tmp_path / "guanaco.jsonl")
    turns = list(read_jsonl(tmp_path / "guanaco.jsonl"))
    other = {**turns[0], "id": "copy-t0", "source_id": "copy"}  # the first turn again, in another conversation
    _, mixed, removed = _run(tmp_path, {"guanaco": [*turns, other]}, settings=FilterSettings(decontaminate=False))
    assert [r["id"] for r in mixed] == [t["id"] for t in turns]
    assert [(r["id"], r["reason"], r["match"]) for r in removed] == [("copy-t0", "exact_duplicate", turns[0]["id"])]


def test_planted_arc_questions_are_removed_with_their_match(tmp_path, shared_data):
    arc_file = shared_data / "arc" / "hf_schema" / "ARC-Easy-test.jsonl"
    arc = list(read_jsonl(arc_file))
    planted = [
        _alpaca_row(f"planted-{i}", q["question"], q["choices"]["text"][q["choices"]["label"].index(q["answerKey"])])
        for i, q in enumerate(arc[:200:40])
    ]
    rows = _alpaca_rows(shared_data, 300)
    tasks = [prepared(TaskSpec("arc_easy", data_files={"test": str(arc_file)}), tmp_path / "arc_easy")]
    stats, mixed, removed = _run(tmp_path, {"alpaca": rows[:150] + planted + rows[150:]}, tasks=tasks)
    contaminated = {r["id"]: r for r in removed if r["reason"] == "eval_contamination"}
    assert set(contaminated) == {p["id"] for p in planted}
    for i, row in enumerate(planted):
        assert contaminated[row["id"]]["match"] == f"arc_easy#{40 * i}"
    assert not {p["id"] for p in planted} & {r["id"] for r in mixed}
    assert stats["datasets"]["alpaca"]["eval_contamination"] == len(planted)
    assert stats["settings"]["eval_tasks"] == ["arc_easy"]
    for row in planted:
        assert contaminated[row["id"]]["ngram"] in " ".join(words(row["content"]))


def test_planted_arc_challenge_choices_and_hellaswag_contexts_are_removed(tmp_path, shared_data):
    challenge_file = shared_data / "arc" / "hf_schema" / "ARC-Challenge-test.jsonl"
    hellaswag_file = shared_data / "hellaswag" / "hellaswag_val_sample1000.jsonl"
    challenge, hellaswag = list(read_jsonl(challenge_file)), list(read_jsonl(hellaswag_file))
    planted = [
        # A question with all its choices, as a multiple-choice training set would hold it.
        _alpaca_row(f"arc-{i}", q["question"] + " Options: " + ", ".join(q["choices"]["text"]), q["answerKey"])
        for i, q in enumerate(challenge[:100:25])
    ] + [
        # A HellaSwag context continued by its gold ending, reworded as an instruction.
        _alpaca_row(f"hs-{i}", f"Continue the story: {h['ctx']}", h["endings"][int(h["label"])])
        for i, h in enumerate(hellaswag[:400:100])
    ]
    tasks = [
        prepared(TaskSpec("arc_challenge", data_files={"test": str(challenge_file)}), tmp_path / "arc_challenge"),
        prepared(TaskSpec("hellaswag", data_files={"validation": str(hellaswag_file)}), tmp_path / "hellaswag"),
    ]
    rows = _alpaca_rows(shared_data, 200)
    _, mixed, removed = _run(tmp_path, {"alpaca": rows + planted}, tasks=tasks)
    matches = {r["id"]: r["match"] for r in removed if r["reason"] == "eval_contamination"}
    assert matches == {
        **{f"arc-{i}": f"arc_challenge#{25 * i}" for i in range(4)},
        **{f"hs-{i}": f"hellaswag#{100 * i}" for i in range(4)},
    }
    assert {r["id"] for r in mixed} == {r["id"] for r in rows} - set(matches)


def test_train_rows_overlapping_held_out_rows_are_removed(tmp_path, shared_data):
    from sftpipe.splits import assign_split

    rows = _alpaca_rows(shared_data, 200)
    test_row = next(r for r in rows if assign_split(r["source_id"], SplitSettings(0.1, 0.1, 0)) == "test")
    # A training row that asks the held-out question again, worded around it, with another answer.
    leak_id = next(f"leak-{i}" for i in range(1000) if assign_split(f"leak-{i}", SplitSettings(0.1, 0.1, 0)) == "train")
    leak = _alpaca_row(leak_id, "Please answer this: " + test_row["content"], "Something else entirely.")
    settings = FilterSettings(near_dedup=False)
    _, mixed, removed = _run(tmp_path, {"alpaca": rows + [leak]}, settings=settings)
    assert [(r["id"], r["reason"], r["match"]) for r in removed] == [(leak_id, "test_overlap", test_row["id"])]
    assert test_row["id"] in {r["id"] for r in mixed}


def mix(rows, weight, seed, split):
    """The mixture of rows held in memory, as filter_and_mix writes it: the kept rows, then the copies."""
    keep, extra = mix_plan([row_split(r, split) for r in rows], weight, seed)
    return [rows[i] for i in keep] + list(copies(dict(enumerate(rows)), extra))


def test_mixing_fraction_count_and_upsampling():
    split = SplitSettings(0.2, 0.2, 0)
    rows = [{"id": f"r{i}", "source_id": f"r{i}"} for i in range(20)]
    half = mix(rows, 0.5, "1", split)
    assert len(half) == 10 and half == mix(rows, 0.5, "1", split) and half != mix(rows, 0.5, "2", split)
    assert [r["id"] for r in half] == sorted((r["id"] for r in half), key=lambda x: int(x[1:]))
    assert len(mix(rows, 3, "0", split)) == 3
    up = mix(rows, 60, "0", split)
    assert len(up) == 60 and len({r["id"] for r in up}) == 60 and up[:20] == rows
    assert all(r["id"].startswith(f"{r['source_id']}#copy") for r in up[20:])
    # Copies come from training rows only: a held-out row counted twice would skew exact match.
    train = {r["id"] for r in rows if row_split(r, split) == "train"}
    assert 0 < len(train) < 20
    assert {r["source_id"] for r in up[20:]} <= train
    assert mix(rows, None, "0", split) == rows


def test_mixing_ratios_across_datasets(tmp_path):
    a = [
        {"id": f"a{i}", "source_id": f"a{i}", "dataset": "a", "prompt": f"alpha question {i} " * 3, "completion": f"answer {i}"}
        for i in range(40)
    ]
    b = [
        {
            "id": f"b{i}",
            "source_id": f"b{i}",
            "dataset": "b",
            "prompt": f"beta prompt number {i} " * 3,
            "completion": f"reply {i}",
        }
        for i in range(10)
    ]
    settings = FilterSettings(near_dedup=False, decontaminate=False)
    stats, mixed, _ = _run(tmp_path, {"a": a, "b": b}, weights={"a": 0.25, "b": 30}, settings=settings)
    counts = {name: sum(r["dataset"] == name for r in mixed) for name in ("a", "b")}
    assert counts == {"a": 10, "b": 30}
    assert stats["datasets"]["b"] == {
        "rows_in": 10,
        "exact_duplicate": 0,
        "near_duplicate": 0,
        "eval_contamination": 0,
        "test_overlap": 0,
        "rows_after_filters": 10,
        "weight": 30,
        "rows_out": 30,
    }


def test_everything_filtered_is_an_error_and_leaves_no_mixture(tmp_path):
    rows = [{"id": "x", "source_id": "x", "dataset": "a", "prompt": "p", "completion": "c"}]
    with pytest.raises(Exception, match="every row was filtered out"):
        _run(tmp_path, {"a": rows}, weights={"a": 0.01}, settings=FilterSettings(near_dedup=False, decontaminate=False))
    assert not (tmp_path / "mixed.jsonl").exists()


@pytest.mark.parametrize(("weight", "valid"), [(0.25, True), (1, True), (3000, True), (1.5, False), (0, False), (2.0, True)])
def test_weight_is_a_fraction_or_a_whole_row_count(weight, valid):
    from conftest import REPO
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    config = {
        "experiment": "x",
        "base_model": {"name": "tiny", "source": "tiny-random"},
        "datasets": {"a": {"preset": "alpaca", "weight": weight}},
    }
    if valid:
        validate(config, str(REPO / "config" / "schema.yaml"))
    else:
        with pytest.raises(WorkflowError, match=r"instance\['datasets'\]\['a'\]\['weight'\]"):
            validate(config, str(REPO / "config" / "schema.yaml"))
