"""Download and hydrate stages on real samples and on fixtures in the real Guanaco/Dolphin schemas."""

import json

import pytest

from conftest import DOLPHIN_ROWS, GUANACO_ROWS, write_jsonl
from sftpipe.data import DatasetSpec, download_dataset, hydrate_dataset, mirror_location
from sftpipe.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
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
        _, raw, manifest = _download(tmp_path / suffix, "qa", {"format": "qa", "template": "qa", "path": str(tmp_path / f"qa.{suffix}")})
        assert list(read_jsonl(raw)) == rows
        assert manifest["rows"] == 5


def test_builtin_demo_dataset_needs_no_files(tmp_path):
    _, raw, manifest = _download(tmp_path, "demo", {"preset": "sftpipe_demo", "limit": 40})
    rows = list(read_jsonl(raw))
    assert len(rows) == 40 and manifest["source"]["kind"] == "builtin"
    assert len({r["instruction"] for r in rows}) == 40


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "rows.jsonl:2: malformed JSON"),
        (b"", "has no rows"),
        (b'{"instruction": "caf\xe9", "output": "b"}\n', "rows.jsonl:1: not valid UTF-8"),
        (b'["not an object"]\n', "rows.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_local_file_names_the_line_and_leaves_nothing(tmp_path, content, message):
    source = tmp_path / "rows.jsonl"
    source.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match=message):
        _download(out, "bad", {"preset": "alpaca", "path": str(source)})
    assert not out.exists() or list(out.iterdir()) == []


def test_unknown_preset_names_the_key():
    with pytest.raises(PipelineError, match=r"datasets\.mine'\.preset: unknown preset 'alpacca'"):
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
    assert hydrated[0]["prompt"] == ALPACA_WITH_INPUT.format(instruction="Summarize.", input="A long text.")
    assert hydrated[1]["prompt"] == ALPACA_NO_INPUT.format(instruction="Say hi.")
    assert [h["completion"] for h in hydrated] == ["Short.", "Hi!"]
    assert [h["id"] for h in hydrated] == ["alpaca-0000000", "alpaca-0000001"]


def test_hydrate_guanaco_trains_every_assistant_turn(tmp_path):
    hydrated = _hydrate(tmp_path, "guanaco", {"preset": "guanaco"}, GUANACO_ROWS)
    assert hydrated[0]["prompt"] == "### Human: What is the boiling point of water at sea level?### Assistant:"
    assert hydrated[0]["completion"] == " It boils at 100 degrees Celsius."
    # The two-turn conversation gives one row per assistant turn, the earlier exchange as context.
    first, second = hydrated[1], hydrated[2]
    assert (first["id"], second["id"]) == ("guanaco-0000001-t0", "guanaco-0000001-t1")
    assert first["source_id"] == second["source_id"] == "guanaco-0000001"
    assert first["prompt"] == "### Human: Name a primary color.### Assistant:"
    assert first["completion"] == " Red is a primary color."
    assert second["prompt"] + second["completion"] == GUANACO_ROWS[1]["text"]
    assert len(hydrated) == 3


def test_hydrate_dolphin_uses_system_prompt_in_chat_template(tmp_path, tiny_model):
    hydrated = _hydrate(tmp_path, "dolphin", {"preset": "dolphin"}, DOLPHIN_ROWS, tokenizer=tiny_model)
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
    assert [h["id"] for h in hydrated] == ["alpaca-0000000"]
    assert "alpaca.raw.jsonl:2 (dataset 'alpaca', format 'alpaca'): empty completion, row skipped" in caplog.text


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
    hydrated = _hydrate(tmp_path, "qa", {"format": "qa", "template": template, "path": "x"}, [{"question": " Why? ", "answer": "Because."}])
    assert (hydrated[0]["prompt"], hydrated[0]["completion"]) == ("Q: Why?\nA:", " Because.")


def test_user_template_missing_field_names_template_field_and_row(tmp_path):
    template = {"prompt": "{{ question }} {{ context }}", "completion": "{{ answer }}"}
    rows = [{"question": "a", "context": "b", "answer": "c"}, {"question": "a", "answer": "c"}]
    with pytest.raises(PipelineError, match=r"qa\.raw\.jsonl:2 .*template 'datasets\.qa\.template\.prompt': 'context' is undefined"):
        _hydrate(tmp_path, "qa", {"format": "qa", "template": template, "path": "x"}, rows)
    assert not (tmp_path / "qa.jsonl").exists()


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
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Goodbye."}]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Bye"},
                           {"from": "gpt", "value": "Goodbye."}]},
    ],
    ids=["openai", "sharegpt"],
)
def test_chat_messages_formats_train_every_assistant_turn(tmp_path, tiny_model, row):
    hydrated = _hydrate(tmp_path, "chat", {"format": "messages", "template": "chat", "path": "x"}, [row], tokenizer=tiny_model)
    assert [h["completion"] for h in hydrated] == ["Hello.", "Goodbye."]
    assert hydrated[1]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<|im_start|>assistant\nHello.<|im_end|>" in hydrated[1]["prompt"]
    assert hydrated[1]["prompt"].endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")


def test_messages_must_alternate(tmp_path, tiny_model):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    with pytest.raises(PipelineError, match=r"messages\[1\]: turns must alternate"):
        _hydrate(tmp_path, "chat", {"format": "messages", "template": "chat", "path": "x"}, [row], tokenizer=tiny_model)


def test_raw_text_format(tmp_path):
    hydrated = _hydrate(tmp_path, "docs", {"format": "text", "template": "raw", "path": "x"}, [{"text": "A whole document."}])
    assert (hydrated[0]["prompt"], hydrated[0]["completion"]) == ("", "A whole document.")
