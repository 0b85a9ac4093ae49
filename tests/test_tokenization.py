"""Tokenize-and-split: masks from token ids, EOS learned, distinct pad, stable hash split."""

import gc
import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from sftpipe.io import PipelineError, read_jsonl
from sftpipe.model import load_tokenizer
from sftpipe.splits import SplitSettings, assign_split
from sftpipe.tokenization import IGNORE_INDEX, SPLITS, LengthSettings, tokenize_and_split


def _rows(n, start=0):
    return [
        {
            "id": f"t-{i}",
            "dataset": "t",
            "prompt": f"### Human: Count to {i}.### Assistant:",
            "completion": f" {' '.join(map(str, range(i % 7 + 1)))}",
        }
        for i in range(start, start + n)
    ]


FIFTHS = SplitSettings(0.2, 0.2, 0)


def _run(tmp_path, tiny_model, rows, max_length=64, split=FIFTHS, **lengths):
    hydrated = write_jsonl(tmp_path / "hydrated.jsonl", rows)
    outs = {s: tmp_path / f"{s}.jsonl" for s in SPLITS}
    stats = tokenize_and_split(
        [hydrated], tiny_model, outs, tmp_path / "stats.json", LengthSettings(max_length, **lengths), split
    )
    return {s: list(read_jsonl(outs[s])) for s in SPLITS}, stats


def test_labels_are_exactly_completion_plus_eos(tmp_path, tiny_model):
    splits, stats = _run(tmp_path, tiny_model, _rows(60))
    tokenizer = load_tokenizer(tiny_model)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    rows = [r for s in SPLITS for r in splits[s]]
    assert len(rows) == 60 == sum(stats[s]["rows"] for s in SPLITS)
    for row in rows:
        learned = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert tokenizer.decode(learned) == row["completion"] + tokenizer.eos_token
        assert learned[-1] == tokenizer.eos_token_id
        n_prompt = row["labels"].index(learned[0])
        assert row["input_ids"][:n_prompt] == tokenizer(row["prompt"])["input_ids"]
        assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]


def test_truncation_and_drop_counts(tmp_path, tiny_model):
    rows = [
        {"id": "long-completion", "dataset": "t", "prompt": "Q:", "completion": " word" * 50},
        {"id": "long-prompt", "dataset": "t", "prompt": "word " * 50, "completion": " A"},
    ]
    splits, stats = _run(tmp_path, tiny_model, rows, max_length=16, split=SplitSettings(0.0, 0.0, 0))
    assert [r["id"] for r in splits["train"]] == ["long-completion"]
    kept = splits["train"][0]
    assert len(kept["input_ids"]) == 16
    # The cut completion is learned as far as it goes, without an EOS that would teach stopping mid-answer.
    tokenizer = load_tokenizer(tiny_model)
    n_prompt = len(tokenizer("Q:")["input_ids"])
    completion = tokenizer(" word" * 50, add_special_tokens=False)["input_ids"]
    assert kept["labels"] == [IGNORE_INDEX] * n_prompt + completion[: 16 - n_prompt]
    assert stats["train"]["truncated"] == 1 and stats["train"]["dropped_too_long"] == 1
    splits, stats = _run(tmp_path / "drop", tiny_model, rows, max_length=16, split=SplitSettings(0.0, 0.0, 0), overlong="drop")
    assert splits["train"] == [] and stats["train"]["dropped_too_long"] == 2
    short = [{"id": "tiny", "dataset": "t", "prompt": "Q:", "completion": " A"}, *rows[:1]]
    splits, stats = _run(tmp_path / "min", tiny_model, short, max_length=128, split=SplitSettings(0.0, 0.0, 0), min_tokens=10)
    assert [r["id"] for r in splits["train"]] == ["long-completion"] and stats["train"]["dropped_too_short"] == 1


def test_masks_on_real_alpaca_and_multi_turn_chatml(tmp_path, tiny_model, shared_data):
    from conftest import GUANACO_ROWS

    from sftpipe.data import DatasetSpec, hydrate_dataset

    alpaca = json.loads((shared_data / "alpaca" / "alpaca_5000.json").read_text())[:300]
    hydrated = []
    for name, cfg, rows in [
        ("alpaca", {"preset": "alpaca"}, alpaca),
        ("chat", {"format": "guanaco", "template": "chatml", "path": "x"}, GUANACO_ROWS * 3),
    ]:
        raw = write_jsonl(tmp_path / f"{name}.raw.jsonl", rows)
        hydrate_dataset(DatasetSpec.from_config(name, cfg), raw, tmp_path / f"{name}.jsonl")
        hydrated += list(read_jsonl(tmp_path / f"{name}.jsonl"))
    splits, stats = _run(tmp_path / "tok", tiny_model, list({r["id"]: r for r in hydrated}.values()), max_length=2048)
    tokenizer = load_tokenizer(tiny_model)
    rows = [r for s in SPLITS for r in splits[s]]
    assert len(rows) == len({r["id"] for r in hydrated})
    for row in rows:
        learned = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert tokenizer.decode(learned) == row["completion"] + tokenizer.eos_token
    # Each assistant turn of the two-turn conversation is learned in exactly one row, with the earlier
    # turn in its masked prompt.
    conversation = next(r["source_id"] for r in rows if "Blue" in r["completion"])
    turns = sorted((r for r in rows if r["source_id"] == conversation), key=lambda r: r["id"])
    learned_text = [tokenizer.decode([t for t in r["labels"] if t != IGNORE_INDEX]) for r in turns]
    assert learned_text == ["Red is a primary color.<|im_end|>", "Blue is another primary color.<|im_end|>"]
    assert "Red is a primary color." in turns[1]["prompt"]


def test_a_bos_adding_tokenizer_gets_one_bos_even_after_a_chat_template(tmp_path, tiny_model):
    import shutil

    from tokenizers.processors import TemplateProcessing

    # The tiny model's tokenizer with a Llama-style post-processor that puts a BOS before every text
    # and, as with `add_eos_token`, an end token after it.
    tokenizer = load_tokenizer(tiny_model)
    bos, end = "<repo_name>", "<file_sep>"
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {end}",
        pair=f"{bos} $A {end} $B {end}",
        special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in (bos, end)],
    )
    tokenizer.bos_token = bos
    model = tmp_path / "bos-model"
    shutil.copytree(tiny_model, model)
    tokenizer.save_pretrained(model)
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    rows = [
        {"id": "plain", "dataset": "t", "prompt": "Q: hi?\nA:", "completion": " yes"},
        {"id": "templated", "dataset": "t", "prompt": f"{bos}<|im_start|>user\nhi?<|im_end|>\n", "completion": "yes"},
    ]
    splits, _ = _run(tmp_path / "tok", model, rows, split=SplitSettings(0.0, 0.0, 0))
    for row in splits["train"]:
        assert row["input_ids"][0] == bos_id and row["input_ids"][1] != bos_id
        assert tokenizer.convert_tokens_to_ids(end) not in row["input_ids"]
    plain = next(r for r in splits["train"] if r["id"] == "plain")
    assert plain["input_ids"][: plain["labels"].count(IGNORE_INDEX)] == tokenizer("Q: hi?\nA:")["input_ids"][:-1]


def test_stats_per_split_and_per_dataset(tmp_path, tiny_model):
    rows = _rows(60) + [{**r, "id": f"u-{r['id']}", "dataset": "u", "completion": r["completion"] * 9} for r in _rows(30)]
    _, stats = _run(tmp_path, tiny_model, rows, max_length=32)
    assert sum(stats[s]["rows_in"] for s in SPLITS) == 90
    for split in SPLITS:
        per_dataset = stats[split]["datasets"]
        assert set(per_dataset) == {"t", "u"}
        for key in ("rows_in", "rows", "tokens", "completion_tokens", "truncated", "dropped_too_long"):
            assert stats[split][key] == sum(d[key] for d in per_dataset.values())
        for counts in (stats[split], *per_dataset.values()):
            assert sum(counts["length_histogram"].values()) == counts["rows"]
            assert counts["rows_in"] == counts["rows"] + counts["dropped_too_long"] + counts["dropped_too_short"]
        assert per_dataset["t"]["truncated"] == 0
    assert sum(stats[s]["datasets"]["u"]["truncated"] for s in SPLITS) > 0


def test_turns_of_one_conversation_stay_in_one_split(tmp_path, tiny_model):
    rows = [
        {"id": f"c{i}-t{t}", "source_id": f"c{i}", "dataset": "t", "prompt": f"Turn {t} of {i}:", "completion": " ok"}
        for i in range(40)
        for t in range(3)
    ]
    splits, _ = _run(tmp_path, tiny_model, rows)
    where = {r["source_id"]: s for s in SPLITS for r in splits[s]}
    assert all(where[r["source_id"]] == s for s in SPLITS for r in splits[s])
    assert len(set(where.values())) == 3


def test_split_is_stable_when_rows_are_appended(tmp_path, tiny_model):
    first, _ = _run(tmp_path / "a", tiny_model, _rows(100))
    second, _ = _run(tmp_path / "b", tiny_model, _rows(150))
    for split in SPLITS:
        before = {r["id"] for r in first[split]}
        after = {r["id"] for r in second[split]}
        assert before <= after
        assert before == {r["id"] for r in second[split] if int(r["id"].split("-")[1]) < 100}
    assert all(splits for splits in first.values())


def test_split_fractions_are_respected():
    counts = {s: 0 for s in SPLITS}
    for i in range(20000):
        counts[assign_split(f"row-{i}", SplitSettings(0.1, 0.05, 3))] += 1
    assert abs(counts["validation"] / 20000 - 0.1) < 0.01
    assert abs(counts["test"] / 20000 - 0.05) < 0.01


def test_outputs_are_byte_identical_across_runs(tmp_path, tiny_model):
    _run(tmp_path / "a", tiny_model, _rows(80))
    _run(tmp_path / "b", tiny_model, _rows(80))
    for name in [f"{s}.jsonl" for s in SPLITS] + ["stats.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["settings"]["pad_token"] != stats["settings"]["eos_token"]
    assert len(stats["fingerprint"]) == 64


def test_fingerprint_follows_tokenizer_data_and_settings(tmp_path, tiny_model):
    import shutil

    base = _run(tmp_path / "a", tiny_model, _rows(30))[1]["fingerprint"]
    assert _run(tmp_path / "b", tiny_model, _rows(30))[1]["fingerprint"] == base
    assert _run(tmp_path / "c", tiny_model, _rows(30), max_length=48)[1]["fingerprint"] != base
    assert _run(tmp_path / "d", tiny_model, _rows(31))[1]["fingerprint"] != base
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["model_max_length"] = 12345
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    assert _run(tmp_path / "e", other, _rows(30))[1]["fingerprint"] != base


def test_fingerprint_follows_the_code(tmp_path, tiny_model):
    import shutil

    from sftpipe import tokenization
    from sftpipe.tokenization import fingerprint

    hydrated = write_jsonl(tmp_path / "hydrated.jsonl", _rows(5))
    code = Path(tokenization.__file__).parent
    base = fingerprint(tiny_model, [hydrated], {"max_length": 64})
    assert fingerprint(tiny_model, [hydrated], {"max_length": 64}, code_dir=code) == base
    for module in ("tokenization.py", "model.py", "io.py"):
        edited = tmp_path / module.removesuffix(".py")
        shutil.copytree(code, edited)
        (edited / module).write_text((code / module).read_text() + "\n# edited\n")
        assert fingerprint(tiny_model, [hydrated], {"max_length": 64}, code_dir=edited) != base


def test_a_duplicate_id_fails_leaving_no_split_file_and_gc_on(tmp_path, tiny_model):
    # The duplicate comes last, after every split has received rows, so the streamed files exist
    # half-written when the error is raised.
    rows = _rows(40) + [_rows(1, start=3)[0]]
    with pytest.raises(PipelineError, match="dataset 't': row id 't-3' appears twice"):
        _run(tmp_path, tiny_model, rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hydrated.jsonl"]
    assert gc.isenabled()


def test_a_split_the_config_asks_for_but_gets_no_row_names_the_key(tmp_path, tiny_model):
    # 12 rows, 5% each for validation and test, none of which the hash sends to validation.
    rows = [r for r in _rows(60) if assign_split(r["id"], SplitSettings()) != "validation"][:12]
    with pytest.raises(
        PipelineError, match=r"config key 'data.split.validation_fraction': of 12 rows kept, none fell into the validation split"
    ):
        _run(tmp_path, tiny_model, rows, split=SplitSettings())
    assert not list(tmp_path.glob("*.jsonl*")) or [p.name for p in tmp_path.glob("*.jsonl*")] == ["hydrated.jsonl"]
    # A fraction of 0 asks for no such split.
    splits, _ = _run(tmp_path / "none", tiny_model, rows, split=SplitSettings(validation_fraction=0.0, test_fraction=0.2))
    assert splits["validation"] == [] and splits["test"]


def test_the_preview_shows_what_each_dataset_trains_on(tmp_path, tiny_model):
    rows = _rows(30) + [{**r, "id": f"other-{i}", "dataset": "other"} for i, r in enumerate(_rows(30, start=100))]
    splits, stats = _run(tmp_path, tiny_model, rows, split=SplitSettings(0.0, 0.0, 0))
    tokenizer = load_tokenizer(tiny_model)
    assert sorted(stats["preview"]) == ["other", "t"]
    for dataset, previews in stats["preview"].items():
        first_rows = [r for r in splits["train"] if r["dataset"] == dataset][:3]
        assert len(previews) == 3
        for segments, row in zip(previews, first_rows, strict=True):
            assert [s["learned"] for s in segments] == [False, True]
            assert segments[0]["text"] == row["prompt"]
            assert segments[1]["text"] == row["completion"] + tokenizer.eos_token
