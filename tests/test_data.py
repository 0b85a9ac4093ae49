"""Download and hydrate stages on real samples and on fixtures in the real Guanaco/Dolphin schemas."""

import json

import pytest
from conftest import DOLPHIN_ROWS, GUANACO_ROWS, write_jsonl

from sftpipe.data import DatasetSpec, download_dataset, hydrate_dataset, mirror_location
from sftpipe.io import PipelineError, read_jsonl, sha256_file


def _download(tmp_path, name, cfg, mirror_dir=None):
    spec = DatasetSpec.from_config(name, cfg)
    raw, manifest = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.manifest.json"
    download_dataset(spec, raw, manifest, mirror_dir)
    return spec, raw, json.loads(manifest.read_text())


def test_download_local_alpaca_json_with_limit(tmp_path, shared_data):
    source = shared_data / "alpaca" / "alpaca_5000.json"
    spec, raw, manifest = _download(tmp_path, "alpaca", {"preset": "alpaca", "path": str(source), "limit": 25})
    rows = list(read_jsonl(raw))
    assert len(rows) == 25 == manifest["rows"]
    assert rows[0] == json.loads(source.read_text())[0]
    assert manifest["sha256"] == sha256_file(raw)
    assert manifest["source"] == {"kind": "local", "path": str(source.resolve())}
    assert manifest["spec"]["limit"] == 25 and "template" not in manifest["spec"]


def test_download_prefers_mirror_over_hub(tmp_path, shared_data):
    mirror = tmp_path / "mirror"
    (mirror / "tatsu-lab" / "alpaca").mkdir(parents=True)
    (mirror / "tatsu-lab" / "alpaca" / "train.json").symlink_to(shared_data / "alpaca" / "alpaca_5000.json")
    _, raw, manifest = _download(tmp_path, "alpaca", {"preset": "alpaca", "limit": 10}, mirror_dir=str(mirror))
    assert manifest["source"]["kind"] == "mirror"
    assert manifest["source"]["hub_id"] == "tatsu-lab/alpaca"
    assert len(list(read_jsonl(raw))) == 10


def test_mirror_location_with_hub_config(tmp_path):
    target = tmp_path / "allenai" / "ai2_arc" / "ARC-Easy" / "test.jsonl"
    target.parent.mkdir(parents=True)
    target.write_text("{}\n")
    assert mirror_location(tmp_path, "allenai/ai2_arc", "ARC-Easy", "test") == target
    assert mirror_location(tmp_path, "allenai/ai2_arc", "ARC-Easy", "train") is None


def test_download_parquet_and_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"Q{i}?", "answer": f"A{i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    (tmp_path / "qa.csv").write_text("question,answer\n" + "".join(f"Q{i}?,A{i}\n" for i in range(5)))
    for suffix in ("parquet", "csv"):
        _, raw, manifest = _download(
            tmp_path / suffix, "qa", {"format": "qa", "template": "qa", "path": str(tmp_path / f"qa.{suffix}")}
        )
        assert list(read_jsonl(raw)) == rows
        assert manifest["rows"] == 5


def test_download_directory_and_mirror_split_directory(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"A{i}"} for i in range(6)]
    source = tmp_path / "source"
    write_jsonl(source / "b.jsonl", rows[3:])
    (source / "a.json").write_text(json.dumps(rows[:3]))
    (source / "notes.txt").write_text("not data")
    _, raw, _ = _download(tmp_path / "dir", "qa", {"preset": "lamini_docs", "path": str(source)})
    assert list(read_jsonl(raw)) == rows  # files in name order, other files ignored
    mirror = tmp_path / "mirror"
    (mirror / "lamini").mkdir(parents=True)
    (mirror / "lamini" / "lamini_docs").symlink_to(tmp_path / "mirror_src")
    write_jsonl(tmp_path / "mirror_src" / "train" / "part-0.jsonl", rows)
    _, raw, manifest = _download(tmp_path / "mirror_run", "qa", {"preset": "lamini_docs"}, mirror_dir=str(mirror))
    assert manifest["source"]["kind"] == "mirror" and list(read_jsonl(raw)) == rows


def test_hub_source_streams_only_the_rows_it_keeps(tmp_path):
    # A local dataset directory goes through the same `datasets.load_dataset(streaming=True)` call as a
    # Hub id. Past the first 10 MB block the file is broken: reading it whole would fail there.
    hub = tmp_path / "hub_dataset"
    write_jsonl(hub / "train.jsonl", [{"question": f"Q{i}?" + " padding" * 10, "answer": f"A{i}"} for i in range(200_000)])
    with (hub / "train.jsonl").open("a") as handle:
        handle.write('{"question": "broken",\n')
    _, raw, manifest = _download(tmp_path / "out", "qa", {"preset": "lamini_docs", "hub_id": str(hub), "limit": 3})
    assert [r["answer"] for r in read_jsonl(raw)] == ["A0", "A1", "A2"]
    assert manifest["source"]["kind"] == "hub" and manifest["rows"] == 3


def test_source_keys_are_checked():
    with pytest.raises(PipelineError, match=r"datasets\.x': give one source, not 'hub_id' and 'path'"):
        DatasetSpec.from_config("x", {"preset": "alpaca", "hub_id": "a/b", "path": "x.json"})
    with pytest.raises(PipelineError, match=r"datasets\.x\.sha256': a pin needs a 'url' or a 'path'"):
        DatasetSpec.from_config("x", {"preset": "alpaca", "sha256": "0" * 64})


def test_local_file_sha256_pin(tmp_path, shared_data):
    source = shared_data / "alpaca" / "alpaca_5000.json"
    cfg = {"preset": "alpaca", "path": str(source), "limit": 5}
    _, raw, _ = _download(tmp_path / "ok", "alpaca", {**cfg, "sha256": sha256_file(source)})
    assert len(list(read_jsonl(raw))) == 5
    with pytest.raises(PipelineError, match=rf"datasets\.alpaca\.sha256': {source} has sha256 \w+, the config pins 0000"):
        _download(tmp_path / "bad", "alpaca", {**cfg, "sha256": "0" * 64})
    assert list((tmp_path / "bad").iterdir()) == []


def test_builtin_demo_dataset_needs_no_files(tmp_path):
    _, raw, manifest = _download(tmp_path, "demo", {"preset": "sftpipe_demo", "limit": 40})
    rows = list(read_jsonl(raw))
    assert len(rows) == 40 and manifest["source"]["kind"] == "builtin"
    assert len({r["instruction"] for r in rows}) == 40


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        # The column Python's parser gives for the line: the end of the unfinished object, not the next line's start.
        (
            "rows.jsonl",
            b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
            r"rows.jsonl:2:32: malformed JSON \(Expecting value\)",
        ),
        ("rows.json", b'[{"instruction": "a",\n "output": }]', r"rows.json:2:12: malformed JSON \(Expecting value\)"),
        ("rows.jsonl", b"", "source .*rows.jsonl has no rows"),
        ("rows.jsonl", b'{"instruction": "caf\xe9", "output": "b"}\n', "rows.jsonl:1: not valid UTF-8"),
        ("rows.jsonl", b'["not an object"]\n', "rows.jsonl:1: expected a JSON object"),
        (
            "rows.jsonl",
            b'{"instruction": "a", "output": "b"}\n\n{"instruction": "x"}\n',
            r"rows.jsonl:3 .*missing field 'output'",
        ),
        ("rows.jsonl", b'{"instruction": "x", "output": 3}\n', r"rows.jsonl:1 .*field 'output' must be a string, got int"),
        ("rows.json", b"  \n", "rows.json: empty file"),
        (
            "rows.json",
            b'[{"instruction": "a",\n "output": "b"}, {"instruction": "x"}]',
            r"rows.json: element 1 .*missing field 'output'",
        ),
        ("rows.json", b'[{"instruction": "\xff", "output": "b"}]', "rows.json:1: not valid UTF-8"),
        ("rows.csv", b"instruction,output\na,b\nc,d,e\n", "rows.csv:3: more fields than the header's 2"),
        ("rows.csv", b"instruction,output\na,b\nc\n", "rows.csv:3: fewer fields than the header's 2"),
        ("rows.csv", b"instruction,output\n\xe9,b\n", "rows.csv:2: not valid UTF-8"),
        ("rows.parquet", b"PAR1 not really parquet", "rows.parquet: not a readable parquet file"),
    ],
)
def test_bad_local_file_names_the_line_and_leaves_nothing(tmp_path, name, content, message):
    source = tmp_path / name
    source.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match=message):
        _download(out, "bad", {"preset": "alpaca", "path": str(source)})
    assert not out.exists() or list(out.iterdir()) == []


def test_unknown_preset_names_the_key():
    with pytest.raises(PipelineError, match=r"datasets\.mine\.preset': unknown preset 'alpacca'"):
        DatasetSpec.from_config("mine", {"preset": "alpacca"})


def _hydrate(tmp_path, name, cfg, rows, tokenizer=None):
    raw = write_jsonl(tmp_path / f"{name}.raw.jsonl", rows)
    out = tmp_path / f"{name}.jsonl"
    hydrate_dataset(DatasetSpec.from_config(name, cfg), raw, out, tokenizer)
    return list(read_jsonl(out))


def test_hydrate_alpaca_with_and_without_input(tmp_path):
    rows = [
        {"instruction": "Summarize.", "input": "A long text.", "output": "Short."},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    hydrated = _hydrate(tmp_path, "alpaca", {"preset": "alpaca", "path": "x"}, rows)
    assert hydrated[0]["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarize.\n\n### Input:\nA long text.\n\n### Response:\n"
    )
    assert hydrated[1]["prompt"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert [h["completion"] for h in hydrated] == ["Short.", "Hi!"]


def test_row_ids_do_not_depend_on_position_or_collide_across_datasets(tmp_path):
    rows = [{"instruction": f"Task {i}.", "output": f"Done {i}."} for i in range(5)]
    ids = {h["completion"]: h["id"] for h in _hydrate(tmp_path / "a", "alpaca", {"preset": "alpaca"}, rows)}
    shuffled = [{"instruction": "New task.", "output": "New."}, *rows[::-1], rows[0]]
    again = _hydrate(tmp_path / "b", "alpaca", {"preset": "alpaca"}, shuffled)
    assert {h["completion"]: h["id"] for h in again if h["completion"] in ids and not h["id"].endswith("-2")} == ids
    assert len({h["id"] for h in again}) == len(again)  # an identical row gets its own id
    assert all(h["id"].startswith("alpaca-") for h in again)
    # Rows that carry an id keep it, behind their dataset's name.
    qa = [{"id": 7, "question": "Q?", "answer": "A."}]
    assert _hydrate(tmp_path / "c", "one", {"preset": "lamini_docs"}, qa)[0]["id"] == "one-7"
    assert _hydrate(tmp_path / "d", "two", {"preset": "lamini_docs"}, qa)[0]["id"] == "two-7"


def test_templates_without_a_system_slot_keep_the_system_prompt(tmp_path):
    row = DOLPHIN_ROWS[1]
    alpaca = _hydrate(tmp_path, "d1", {"format": "dolphin", "template": "alpaca", "path": "x"}, [row])[0]
    assert (
        alpaca["prompt"]
        == "You are a helpful assistant who answers briefly.\n\n### Instruction:\nWhat is two plus two?\n\n### Response:\n"
    )
    braces = {**row, "instruction": 'Reply as JSON: {"answer": 4}'}
    alpaca = _hydrate(tmp_path, "d3", {"format": "dolphin", "template": "alpaca", "path": "x"}, [braces])[0]
    assert alpaca["prompt"].startswith('Reply as JSON: {"answer": 4}\n\n### Instruction:\n')
    qa = _hydrate(tmp_path, "d2", {"format": "dolphin", "template": "qa", "path": "x"}, [row])[0]
    assert (
        qa["prompt"] == "You are a helpful assistant who answers briefly.\n\n### Question:\nWhat is two plus two?\n\n### Answer:"
    )
    with pytest.raises(PipelineError, match="the 'qa' template has no place for earlier turns"):
        _hydrate(tmp_path, "g", {"format": "guanaco", "template": "qa", "path": "x"}, [GUANACO_ROWS[1]])


def test_hydrate_guanaco_trains_every_assistant_turn(tmp_path):
    hydrated = _hydrate(tmp_path, "guanaco", {"preset": "guanaco"}, GUANACO_ROWS)
    assert hydrated[0]["prompt"] == "### Human: What is the boiling point of water at sea level?### Assistant:"
    assert hydrated[0]["completion"] == " It boils at 100 degrees Celsius."
    # The two-turn conversation gives one row per assistant turn, the earlier exchange as context.
    first, second = hydrated[1], hydrated[2]
    assert (first["id"], second["id"]) == (f"{first['source_id']}-t0", f"{first['source_id']}-t1")
    assert first["source_id"] == second["source_id"] != hydrated[0]["source_id"]
    assert first["prompt"] == "### Human: Name a primary color.### Assistant:"
    assert first["completion"] == " Red is a primary color."
    assert second["prompt"] + second["completion"] == GUANACO_ROWS[1]["text"]
    assert len(hydrated) == 3


def test_hydrate_dolphin_in_chatml_with_its_system_prompt(tmp_path):
    hydrated = _hydrate(tmp_path, "dolphin", {"preset": "dolphin"}, DOLPHIN_ROWS)
    assert hydrated[1]["prompt"] == (
        "<|im_start|>system\nYou are a helpful assistant who answers briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert hydrated[1]["completion"] == "Four."


def test_chatml_template_keeps_earlier_turns(tmp_path):
    first, second = _hydrate(tmp_path, "g", {"format": "guanaco", "template": "chatml", "path": "x"}, [GUANACO_ROWS[1]])
    assert second["prompt"] == (
        "<|im_start|>user\nName a primary color.<|im_end|>\n<|im_start|>assistant\nRed is a primary color.<|im_end|>\n"
        "<|im_start|>user\nName another one.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (first["completion"], second["completion"]) == ("Red is a primary color.", "Blue is another primary color.")


def test_hydrate_dolphin_with_the_models_chat_template(tmp_path, tiny_model):
    hydrated = _hydrate(tmp_path, "dolphin", {"preset": "dolphin", "template": "chat"}, DOLPHIN_ROWS, tokenizer=tiny_model)
    prompt = hydrated[0]["prompt"]
    assert prompt.startswith("<|im_start|>system\nYou are an AI assistant.")
    assert "<|im_start|>user\nTranslate to French: Good morning.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert hydrated[0]["completion"] == "Bonjour."


def test_hydrate_lamini_docs_matches_course_template(tmp_path, shared_data):
    rows = list(read_jsonl(shared_data / "lamini_docs" / "lamini_docs.jsonl"))[:3]
    hydrated = _hydrate(tmp_path, "lamini", {"preset": "lamini_docs"}, rows)
    assert hydrated[0]["prompt"] == f"### Question:\n{rows[0]['question']}\n\n### Answer:"
    assert hydrated[0]["completion"] == rows[0]["answer"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"instruction": "x", "input": ""}], r"alpaca.raw.jsonl:1 .*missing field 'output'"),
        ([{"instruction": "x", "output": 3}], r"alpaca.raw.jsonl:1 .*field 'output' must be a string, got int"),
    ],
)
def test_hydrate_bad_rows_name_file_line_and_field(tmp_path, rows, message):
    with pytest.raises(PipelineError, match=message):
        _hydrate(tmp_path, "alpaca", {"preset": "alpaca"}, rows)
    assert not (tmp_path / "alpaca.jsonl").exists()


def test_empty_completions_are_skipped_with_a_warning(tmp_path, caplog):
    rows = [{"instruction": "x", "output": "y"}, {"instruction": "Retrieve data", "input": "", "output": ""}]
    with caplog.at_level("WARNING", logger="sftpipe"):
        hydrated = _hydrate(tmp_path, "alpaca", {"preset": "alpaca"}, rows)
    assert [h["completion"] for h in hydrated] == ["y"]
    assert "alpaca.raw.jsonl:2 (dataset 'alpaca'): empty completion, row skipped" in caplog.text


def test_guanaco_text_without_turns_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="alternate '### Human:' and '### Assistant:'"):
        _hydrate(tmp_path, "guanaco", {"preset": "guanaco"}, [{"text": "### Human: only a question"}])


def test_download_and_hydrate_are_byte_identical_across_runs(tmp_path, shared_data):
    cfg = {"preset": "alpaca", "path": str(shared_data / "alpaca" / "alpaca_5000.json"), "limit": 200}
    outputs = []
    for run in ("a", "b"):
        spec, raw, _ = _download(tmp_path / run, "alpaca", cfg)
        hydrate_dataset(spec, raw, tmp_path / run / "hydrated.jsonl")
        outputs.append((raw.read_bytes(), (tmp_path / run / "hydrated.jsonl").read_bytes()))
    assert outputs[0] == outputs[1]


@pytest.fixture
def http_server(shared_data):
    """A local HTTP server on 127.0.0.1 serving ../shared/data."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shared_data))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_source_with_sha256_pin(tmp_path, http_server, shared_data):
    url = f"{http_server}/alpaca/alpaca_5000.json"
    pin = sha256_file(shared_data / "alpaca" / "alpaca_5000.json")
    _, raw, manifest = _download(tmp_path, "alpaca", {"preset": "alpaca", "url": url, "sha256": pin, "limit": 30})
    assert manifest["source"] == {"kind": "url", "url": url, "sha256": pin}
    assert list(read_jsonl(raw)) == json.loads((shared_data / "alpaca" / "alpaca_5000.json").read_text())[:30]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpaca.jsonl", "alpaca.manifest.json"]


def test_url_sha256_mismatch_is_an_error_and_leaves_nothing(tmp_path, http_server):
    url = f"{http_server}/alpaca/alpaca_5000.json"
    with pytest.raises(PipelineError, match=r"datasets\.alpaca\.sha256'.*the config pins 0000"):
        _download(tmp_path, "alpaca", {"preset": "alpaca", "url": url, "sha256": "0" * 64})
    assert list(tmp_path.iterdir()) == []


def test_url_that_does_not_answer_names_the_key(tmp_path, http_server):
    with pytest.raises(PipelineError, match=r"datasets\.alpaca\.url'.*could not download"):
        _download(tmp_path, "alpaca", {"preset": "alpaca", "url": f"{http_server}/missing.jsonl"})


def test_user_jinja_template_renders_raw_fields(tmp_path):
    template = {"prompt": "Q: {{ question | trim }}\nA:", "completion": " {{ answer }}"}
    hydrated = _hydrate(
        tmp_path, "qa", {"format": "qa", "template": template, "path": "x"}, [{"question": " Why? ", "answer": "Because."}]
    )
    assert (hydrated[0]["prompt"], hydrated[0]["completion"]) == ("Q: Why?\nA:", " Because.")


def test_user_template_missing_field_names_template_field_and_row(tmp_path):
    template = {"prompt": "{{ question }} {{ context }}", "completion": "{{ answer }}"}
    rows = [{"question": "a", "context": "b", "answer": "c"}, {"question": "a", "answer": "c"}]
    with pytest.raises(
        PipelineError, match=r"qa\.raw\.jsonl:2 .*template 'datasets\.qa\.template\.prompt': 'context' is undefined"
    ):
        _hydrate(tmp_path, "qa", {"format": "qa", "template": template, "path": "x"}, rows)
    assert not (tmp_path / "qa.jsonl").exists()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": None, "answer": "b"}, "prints a NoneType value \\(field 'question'\\)"),
        ({"question": ["a", "b"], "answer": "b"}, "prints a list value \\(field 'question'\\)"),
        ({"question": "a", "answer": "b", "n": "3"}, "TypeError: "),
    ],
    ids=["none", "list", "arithmetic-on-string"],
)
def test_user_template_type_errors_name_template_and_row(tmp_path, row, message):
    template = {"prompt": "{{ question }}{% if n is defined %}{{ n - 1 }}{% endif %}", "completion": "{{ answer }}"}
    with pytest.raises(
        PipelineError, match=rf"u\.raw\.jsonl:1 \(dataset 'u'\): template 'datasets\.u\.template\.prompt': {message}"
    ):
        _hydrate(tmp_path, "u", {"template": template, "path": "x"}, [row])


def test_user_template_reads_any_field_name_without_a_format(tmp_path):
    # `self` would clash with a keyword argument of Jinja's render(); the row goes in as one mapping.
    hydrated = _hydrate(
        tmp_path,
        "u",
        {"template": {"prompt": "{{ ctx }}", "completion": "{{ ending }}"}, "path": "x"},
        [{"ctx": "Context", "ending": " end.", "self": "x"}],
    )
    assert (hydrated[0]["prompt"], hydrated[0]["completion"]) == ("Context", " end.")


def test_user_template_runs_in_a_sandbox(tmp_path):
    template = {"prompt": "{{ question.__class__.__mro__[1].__subclasses__() }}", "completion": "{{ answer }}"}
    with pytest.raises(PipelineError, match="is unsafe|undefined"):
        _hydrate(tmp_path, "qa", {"format": "qa", "template": template, "path": "x"}, [{"question": "a", "answer": "b"}])


def test_user_template_syntax_error_names_the_key():
    with pytest.raises(PipelineError, match=r"datasets\.qa\.template\.prompt'"):
        DatasetSpec.from_config("qa", {"format": "qa", "template": {"prompt": "{{ oops", "completion": "x"}, "path": "x"})


@pytest.mark.parametrize(
    "row",
    [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."},
            ]
        },
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Goodbye."},
            ]
        },
    ],
    ids=["openai", "sharegpt"],
)
def test_chat_messages_formats_train_every_assistant_turn(tmp_path, tiny_model, row):
    hydrated = _hydrate(tmp_path, "chat", {"format": "messages", "template": "chat", "path": "x"}, [row], tokenizer=tiny_model)
    assert [h["completion"] for h in hydrated] == ["Hello.", "Goodbye."]
    assert hydrated[1]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<|im_start|>assistant\nHello.<|im_end|>" in hydrated[1]["prompt"]
    assert hydrated[1]["prompt"].endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("fmt", "row"),
    [
        (
            "messages",
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Bye"},
                ]
            },
        ),
        ("guanaco", {"text": "### Human: Hi### Assistant: Hello.### Human: Bye"}),
    ],
)
def test_unanswered_last_user_turn_is_left_out_with_a_warning(tmp_path, caplog, fmt, row):
    with caplog.at_level("WARNING", logger="sftpipe"):
        hydrated = _hydrate(tmp_path, "chat", {"format": fmt, "template": "chatml", "path": "x"}, [row])
    assert [h["completion"] for h in hydrated] == ["Hello."]
    assert "chat.raw.jsonl:1 (dataset 'chat'): the last user turn has no answer to learn" in caplog.text


@pytest.mark.parametrize(
    ("fmt", "template"),
    [("alpaca", "alpaca"), ("dolphin", "chatml"), ("guanaco", "guanaco"), ("messages", "chat"), ("qa", "qa"), ("text", "raw")],
)
def test_a_format_without_a_template_takes_its_natural_one(fmt, template):
    assert DatasetSpec.from_config("mine", {"format": fmt, "path": "x"}).template == template


def test_a_dataset_without_format_or_template_names_what_to_add():
    with pytest.raises(PipelineError, match=r"config key 'datasets.mine': give a 'preset', a 'format' \(one of alpaca, "):
        DatasetSpec.from_config("mine", {"path": "x"})


def test_messages_must_alternate(tmp_path, tiny_model):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    with pytest.raises(PipelineError, match=r"messages\[1\]: turns must alternate"):
        _hydrate(tmp_path, "chat", {"format": "messages", "template": "chat", "path": "x"}, [row], tokenizer=tiny_model)


def test_raw_text_format(tmp_path):
    hydrated = _hydrate(tmp_path, "docs", {"format": "text", "template": "raw", "path": "x"}, [{"text": "A whole document."}])
    assert (hydrated[0]["prompt"], hydrated[0]["completion"]) == ("", "A whole document.")


def test_an_empty_system_prompt_stays_empty(tmp_path, tiny_model):
    """An empty Dolphin `instruction` says there is no system prompt: the chat template gets an empty
    system message, so it inserts no default of its own (SmolLM2's would), and Alpaca loses its preamble."""
    from sftpipe.data import load_chat_template

    row = {**DOLPHIN_ROWS[1], "instruction": ""}
    default = load_chat_template(tiny_model)([{"role": "user", "content": "x"}])
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant")  # what an absent one becomes
    chat = _hydrate(tmp_path, "d1", {"preset": "dolphin", "template": "chat"}, [row], tokenizer=tiny_model)[0]
    assert (
        chat["prompt"]
        == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    )
    chatml = _hydrate(tmp_path, "d2", {"preset": "dolphin"}, [row])[0]
    assert chatml["prompt"].startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    alpaca = _hydrate(tmp_path, "d3", {"format": "dolphin", "template": "alpaca", "path": "x"}, [row])[0]
    assert alpaca["prompt"] == "### Instruction:\nWhat is two plus two?\n\n### Response:\n"
