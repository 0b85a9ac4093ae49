"""Export stage: GGUF files written by llama.cpp's own converter, read back by transformers' GGUF loader
(and by llama.cpp itself: `pytest -m llama_cpp`) and compared with the merged model they came from."""

import io
import json
import shutil
import sys
import tarfile

import pytest
import torch
from conftest import write_jsonl

from sftpipe.evaluate import evaluate_exact_match, generate_greedy
from sftpipe.export import converter_dir, export_gguf, extract_converter, ollama_modelfile
from sftpipe.io import PipelineError, read_jsonl, sha256_file
from sftpipe.model import load_model, load_tokenizer
from sftpipe.tokenization import IGNORE_INDEX, prompt_token_ids

TYPES = ["f16", "q8_0"]
# The largest |logit - merged logit| each type may show on the tiny model, whose logits stay within
# about ±1.4: f16 measured 3.3e-4, q8_0 8.6e-3 (and through llama.cpp 4.6e-4 and 9.9e-3).
LOGIT_BOUNDS = {"f16": 2e-3, "q8_0": 3e-2}
QUESTIONS = ["What is 12 plus 30?", "Reverse the order of these words: red lamp river", "Sort: 5 3 9 1", "Is 17 prime?"]
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_MODELFILE = '''FROM ./tiny-q8_0.gguf
TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""
PARAMETER stop "<|im_start|>"
PARAMETER stop "<|im_end|>"
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("export") / "tiny"
    with pytest.MonkeyPatch.context() as env:
        # Set for PyPI's gguf, with which llama.cpp's converter fails: it must run on its own gguf-py anyway.
        env.setenv("NO_LOCAL_GGUF", "1")
        export_gguf(tiny_model, out, "tiny", TYPES)
    return out


@pytest.fixture(scope="module")
def merged(tiny_model):
    """The merged model (the tiny one stands in for it), its tokenizer and the prompts rendered with its chat template."""
    tokenizer = load_tokenizer(tiny_model)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    return load_model(tiny_model).eval(), tokenizer, prompts


@torch.no_grad()
def _logits(model, tokenizer, prompts):
    return [model(**tokenizer(p, return_tensors="pt")).logits[0] for p in prompts]


def test_export_writes_the_gguf_files_a_modelfile_and_a_manifest(exported, tiny_model):
    assert sorted(p.name for p in exported.iterdir()) == ["Modelfile", "manifest.json", "tiny-f16.gguf", "tiny-q8_0.gguf"]
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["converter"] == {
        "package": "llama-cpp-python",
        "version": "0.3.36",
        "sdist_sha256": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        "script": "vendor/llama.cpp/convert_hf_to_gguf.py",
    }
    assert manifest["files"] == {
        f"tiny-{t}.gguf": {
            "type": t,
            "bytes": (exported / f"tiny-{t}.gguf").stat().st_size,
            "sha256": sha256_file(exported / f"tiny-{t}.gguf"),
        }
        for t in TYPES
    }
    # ChatML becomes Ollama's Go template, with the template's default system prompt and both turn markers as stops.
    assert (exported / "Modelfile").read_text() == CHATML_MODELFILE
    assert manifest["modelfile"]["serves"] == "tiny-q8_0.gguf" and manifest["modelfile"]["template"] == "chatml"


@pytest.mark.parametrize(("gguf_type", "file_type"), [("f16", 1), ("q8_0", 7)])
def test_gguf_metadata_holds_the_tokenizer_and_the_chat_template(exported, merged, gguf_type, file_type):
    from gguf import GGUFReader

    _, tokenizer, _ = merged
    reader = GGUFReader(exported / f"tiny-{gguf_type}.gguf")

    def value(key):
        return reader.fields[key].contents()

    assert value("general.file_type") == file_type  # llama.cpp's LLAMA_FTYPE_MOSTLY_F16, _Q8_0
    assert value("tokenizer.ggml.model") == "gpt2"  # byte-level BPE, as the tokenizer is
    assert value("tokenizer.chat_template") == tokenizer.chat_template
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer) and tokens[:3] == tokenizer.convert_ids_to_tokens([0, 1, 2])
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert value("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert value("tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("gguf_type", TYPES)
def test_transformers_reads_back_the_merged_model(exported, merged, gguf_type):
    model, tokenizer, prompts = merged
    read_back = load_model(exported, gguf_file=f"tiny-{gguf_type}.gguf").eval()
    for ours, theirs in zip(_logits(read_back, tokenizer, prompts), _logits(model, tokenizer, prompts), strict=True):
        assert (ours - theirs).abs().max().item() < LOGIT_BOUNDS[gguf_type]
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert generate_greedy(read_back, tokenizer, prompts, 16, 4) == generate_greedy(model, tokenizer, prompts, 16, 4)


def test_exact_match_of_the_exported_model_reads_its_gguf_file_alone(exported, merged, tiny_model, tmp_path):
    model, tokenizer, prompts = merged
    answers = generate_greedy(model, tokenizer, prompts, 8, 4)
    # Half the references are the merged model's own answers: both models score them, and miss the rest.
    rows = []
    for i, (prompt, answer, ids) in enumerate(zip(prompts, answers, prompt_token_ids(tokenizer, prompts), strict=True)):
        completion = answer if i % 2 else "never this"
        learned = tokenizer(completion, add_special_tokens=False)["input_ids"]
        # As training tokenized them: the GGUF file's tokenizer must give the same prompt tokens.
        rows.append(
            {
                "id": str(i),
                "dataset": "d",
                "prompt": prompt,
                "completion": completion,
                "input_ids": ids + learned,
                "labels": [IGNORE_INDEX] * len(ids) + learned,
            }
        )
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    scores = {}
    for variant, directory, gguf_file in (("tuned", tiny_model, None), ("exported", exported, "tiny-q8_0.gguf")):
        out = tmp_path / variant
        scores[variant] = evaluate_exact_match(
            directory, test, out / "m.json", out / "p.jsonl", max_new_tokens=8, batch_size=4, gguf_file=gguf_file
        )
        scores[variant]["predictions"] = [p["prediction"] for p in read_jsonl(out / "p.jsonl")]
    # The export directory has no safetensors and no tokenizer files: the GGUF file is all there is to read.
    assert not list(exported.glob("*.safetensors")) and not (exported / "tokenizer.json").exists()
    assert scores["exported"]["predictions"] == scores["tuned"]["predictions"] == answers
    assert scores["exported"]["exact_match"] == scores["tuned"]["exact_match"] == 0.5
    assert scores["exported"]["settings"]["gguf_file"] == "tiny-q8_0.gguf" and "gguf_file" not in scores["tuned"]["settings"]


PLAIN_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    ("template", "system"),
    [(None, SMOLLM_SYSTEM), (PLAIN_CHATML, "")],
    ids=["smollm2's, with a default system prompt", "without one"],
)
def test_a_chatml_template_becomes_ollamas_go_template(tiny_model, template, system):
    tokenizer = load_tokenizer(tiny_model)
    tokenizer.chat_template = template or tokenizer.chat_template
    modelfile, about = ollama_modelfile(tokenizer, "tiny-q8_0.gguf")
    assert modelfile == (CHATML_MODELFILE if system else CHATML_MODELFILE.replace(f'SYSTEM """{SMOLLM_SYSTEM}"""\n', ""))
    assert about == {"template": "chatml", "system": system, "stop": ["<|im_start|>", "<|im_end|>"]}


@pytest.mark.parametrize(
    "template",
    [
        # Alpaca-like: no turn markers at all.
        "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}### assistant:\n",
        # ChatML markers, but system messages dropped.
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endif %}{% endfor %}{{ '<|im_start|>assistant\n' }}",
        None,
    ],
    ids=["not chatml", "chatml without system turns", "no template"],
)
def test_a_template_it_cannot_translate_is_left_to_ollama(tiny_model, template):
    tokenizer = load_tokenizer(tiny_model)
    tokenizer.chat_template = template
    modelfile, about = ollama_modelfile(tokenizer, "m.gguf")
    assert modelfile.splitlines() == [
        "# Not a ChatML chat template: Ollama picks its template from the GGUF's (see `ollama show --template`).",
        "FROM ./m.gguf",
        'PARAMETER stop "<|im_end|>"',
    ]
    assert about == {"template": "ollama's choice", "system": None, "stop": ["<|im_end|>"]}


def _no_trace(out):
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize(
    ("types", "serve", "message"),
    [
        (["f16"], "q8_0", "config key 'export.serve': 'q8_0' is not among the exported types (export.gguf: f16)"),
        (["f16", "q5"], "f16", "config key 'export.gguf': q5 not among f16, bf16, q8_0, q4_k_m"),
        ([], "q8_0", "config key 'export.gguf': no GGUF type to export"),
    ],
    ids=["served type not exported", "unknown type", "nothing to export"],
)
def test_bad_export_settings_name_the_key(tmp_path, tiny_model, types, serve, message):
    with pytest.raises(PipelineError) as error:
        export_gguf(tiny_model, tmp_path / "out", "tiny", types, serve)
    assert str(error.value) == message
    _no_trace(tmp_path / "out")


def test_q4_k_m_without_llama_cpp_names_the_key_and_how_to_install_it(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as where llama-cpp-python is not installed
    # Before anything is fetched or converted: here the converter could not even be fetched.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(PipelineError, match=r"config key 'export.gguf': q4_k_m needs .*pip install llama-cpp-python==0\.3\.36"):
        export_gguf(tiny_model, tmp_path / "out", "tiny", ["q8_0", "q4_k_m"])
    _no_trace(tmp_path / "out")


def test_a_model_the_converter_cannot_read_fails_and_leaves_nothing(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(PipelineError, match=r"model: llama.cpp's converter could not write the GGUF files: .*NoSuchForCausalLM"):
        export_gguf(model, tmp_path / "out", "tiny", TYPES)
    _no_trace(tmp_path / "out")
    with pytest.raises(PipelineError, match=r"not a model directory \(no config.json\)"):
        export_gguf(tmp_path / "nothing", tmp_path / "out", "tiny", TYPES)


def _sdist(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_converter_is_taken_from_the_pinned_sdist_alone(tmp_path):
    sdist = _sdist(
        tmp_path / "llama_cpp_python-0.3.36.tar.gz",
        {
            "vendor/llama.cpp/convert_hf_to_gguf.py": "main()",
            "vendor/llama.cpp/conversion/llama.py": "",
            "vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
            "vendor/llama.cpp/src/llama.cpp": "",
            "llama_cpp/llama.py": "",
        },
    )
    with pytest.raises(PipelineError, match=r"llama_cpp_python-0.3.36.tar.gz: sha256 [0-9a-f]{64} is not the pinned 832db069"):
        extract_converter(sdist, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    extract_converter(sdist, tmp_path / "converter", sha256=sha256_file(sdist))
    extracted = sorted(str(p.relative_to(tmp_path / "converter")) for p in (tmp_path / "converter").rglob("*") if p.is_file())
    assert extracted == ["conversion/llama.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]


def test_no_package_index_is_a_clear_error_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as on a machine that cannot reach PyPI
    with pytest.raises(
        PipelineError, match=r"could not download llama-cpp-python==0.3.36, whose sdist holds llama.cpp's GGUF converter"
    ):
        converter_dir()
    assert [p.name for p in (tmp_path / "sftpipe").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.llama_cpp
@pytest.mark.parametrize("gguf_type", TYPES)
def test_llama_cpp_reads_back_the_merged_model(exported, merged, gguf_type):
    import numpy as np
    from llama_cpp import Llama

    model, tokenizer, prompts = merged
    llm = Llama(str(exported / f"tiny-{gguf_type}.gguf"), n_ctx=256, logits_all=True, verbose=False)
    for prompt, theirs in zip(prompts, _logits(model, tokenizer, prompts), strict=True):
        ids = tokenizer(prompt)["input_ids"]
        # llama.cpp tokenizes the prompt from the GGUF's vocabulary as transformers does from the merged model's.
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        ours = np.array(llm.scores[: llm.n_tokens])
        assert np.abs(ours - theirs.numpy()).max() < LOGIT_BOUNDS[gguf_type]
        assert (ours.argmax(-1) == theirs.numpy().argmax(-1)).all()
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
        tokens = llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
        assert [next(tokens) for _ in greedy] == greedy


@pytest.mark.llama_cpp
def test_q4_k_m_is_quantized_by_llama_cpp_from_f16(tmp_path, tiny_model, merged):
    import llama_cpp
    import numpy as np

    model, tokenizer, prompts = merged
    manifest = export_gguf(tiny_model, tmp_path / "out", "tiny", ["q4_k_m"], serve="q4_k_m")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "manifest.json", "tiny-q4_k_m.gguf"]
    assert manifest["quantizer"] == {"llama_cpp_python": "0.3.36"}
    # The tiny model's 64- and 128-wide rows are not whole 256-wide K-quant blocks: llama.cpp falls back per tensor.
    assert manifest["files"]["tiny-q4_k_m.gguf"]["tensor_types"] == {"F32": 5, "Q5_0": 12, "Q8_0": 3}
    llm = llama_cpp.Llama(str(tmp_path / "out" / "tiny-q4_k_m.gguf"), n_ctx=256, logits_all=True, verbose=False)
    ids = tokenizer(prompts[0])["input_ids"]
    llm.eval(ids)
    [theirs] = _logits(model, tokenizer, prompts[:1])
    assert np.abs(np.array(llm.scores[: llm.n_tokens]) - theirs.numpy()).max() < 0.1
