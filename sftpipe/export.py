"""Export stage: the merged model as GGUF files for llama.cpp and Ollama, an Ollama Modelfile and a manifest.

The conversion is llama.cpp's own `convert_hf_to_gguf.py`, from the llama.cpp that the pinned
llama-cpp-python sdist on PyPI vendors: fetched with pip the first time on a machine, checked
against its sha256 and kept in a cache named after that hash. Its own `gguf-py` comes with it
(PyPI's gguf lags behind the converter), so it runs as a subprocess, never imported into a process
that transformers may have given PyPI's gguf. K-quants (q4_k_m) need llama.cpp's compiled
quantizer, which only an installed llama-cpp-python has.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import PipelineError, atomic_path, sha256_file, write_json
from .model import load_tokenizer

log = logging.getLogger("sftpipe")

CONVERTER_PACKAGE = "llama-cpp-python"
CONVERTER_VERSION = "0.3.36"
CONVERTER_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_VENDORED = f"llama_cpp_python-{CONVERTER_VERSION}/vendor/llama.cpp/"
# The converter's driver, its per-architecture classes, its gguf-py and the chat templates a few
# architectures read: all it needs of the 76 MB sdist.
_CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "models/templates/")


@dataclass(frozen=True)
class GgufType:
    """How a GGUF type is made: by the converter (`outtype`), or by llama.cpp's quantizer from the
    f16 file (`llama_ftype`, a LLAMA_FTYPE_MOSTLY_* name)."""

    outtype: str | None = None
    llama_ftype: str | None = None


GGUF_TYPES: dict[str, GgufType] = {
    "f16": GgufType(outtype="f16"),
    "bf16": GgufType(outtype="bf16"),
    "q8_0": GgufType(outtype="q8_0"),
    "q4_k_m": GgufType(llama_ftype="Q4_K_M"),
}


@dataclass(frozen=True)
class ExportSettings:
    """The config's `export` section."""

    gguf: tuple[str, ...] = ()
    serve: str = "q8_0"

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> ExportSettings:
        settings = cls(tuple(section.get("gguf", ())), section.get("serve", cls.serve))
        unknown = [t for t in settings.gguf if t not in GGUF_TYPES]
        if unknown:
            raise PipelineError(f"config key 'export.gguf': {', '.join(unknown)} not among {', '.join(GGUF_TYPES)}")
        if settings.gguf and settings.serve not in settings.gguf:
            raise PipelineError(
                f"config key 'export.serve': '{settings.serve}' is not among the exported types "
                f"(export.gguf: {', '.join(settings.gguf)})"
            )
        return settings

    def file(self, name: str, gguf_type: str | None = None) -> str:
        """The file name of `name`'s GGUF of `gguf_type` (default: the served one)."""
        return f"{name}-{gguf_type or self.serve}.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sftpipe"


def converter_dir() -> Path:
    """The converter extracted from the pinned sdist, fetched and extracted once per machine."""
    cache = cache_dir()
    dest = cache / f"llama.cpp-converter-{CONVERTER_VERSION}-{CONVERTER_SHA256[:16]}"
    if dest.is_dir():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    # Jobs exporting side by side (a sweep, two workflows) share the cache: one fetches, the others wait.
    with open(cache / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.is_dir():
            with tempfile.TemporaryDirectory(dir=cache) as download, atomic_path(dest) as tmp:
                extract_converter(download_sdist(Path(download)), tmp)
    return dest


def download_sdist(into: Path) -> Path:
    """pip's download of the pinned sdist (pip's own index settings apply: PIP_INDEX_URL, PIP_FIND_LINKS)."""
    requirement = f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}"
    log.info("fetching %s from the package index (once per machine) for llama.cpp's converter", requirement)
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement, "-d", str(into)],
        capture_output=True,
        text=True,
    )
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if pip.returncode != 0 or not found:
        reason = (pip.stderr.strip().splitlines() or ["pip found no sdist"])[-1]
        raise PipelineError(
            f"could not download {requirement}, whose sdist holds llama.cpp's GGUF converter: {reason} "
            f"(needed once per machine; it is kept under {cache_dir()})"
        )
    return found[0]


def extract_converter(sdist: Path, dest: Path, sha256: str = CONVERTER_SHA256) -> None:
    """The converter's files from `sdist` into `dest`, after checking the sdist is the pinned one."""
    got = sha256_file(sdist)
    if got != sha256:
        raise PipelineError(f"{sdist}: sha256 {got} is not the pinned {sha256} of {CONVERTER_PACKAGE} {CONVERTER_VERSION}")
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            relative = member.name.removeprefix(_VENDORED)
            if member.isfile() and relative.startswith(_CONVERTER_FILES):
                member.name = relative
                members.append(member)
        tar.extractall(dest, members=members, filter="data")


# Every conversion of an export in one process: the converter's imports (torch among them) take seconds.
_CONVERT_EACH = (
    "import json, runpy, sys\n"
    "for argv in json.loads(sys.argv[1]):\n"
    "    sys.argv = argv\n"
    "    runpy.run_path(argv[0], run_name='__main__')\n"
)


def convert(converter: Path, model_dir: Path, outputs: dict[str, Path], name: str) -> None:
    """llama.cpp's converter, once per outtype -> file of `outputs`; its output goes to the log."""
    script = str(converter / "convert_hf_to_gguf.py")
    runs = [[script, str(model_dir), "--outtype", t, "--outfile", str(f), "--model-name", name] for t, f in outputs.items()]
    # The converter's `conversion` package sits beside it; its own gguf-py goes first on sys.path
    # unless NO_LOCAL_GGUF is set.
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(converter), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _CONVERT_EACH, json.dumps(runs)], capture_output=True, text=True, env=env)
    output = (result.stdout + result.stderr).strip()
    log.info("llama.cpp's converter:\n%s", output)
    if result.returncode != 0:
        reason = next((line for line in reversed(output.splitlines()) if line.strip()), f"exit status {result.returncode}")
        raise PipelineError(f"{model_dir}: llama.cpp's converter could not write the GGUF files: {reason}")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise PipelineError(
            f"config key 'export.gguf': q4_k_m needs llama.cpp's quantizer, which llama-cpp-python has: pip install "
            f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION} (PyPI has its source only: the install compiles llama.cpp, "
            "about 20 minutes on 2 cores)"
        ) from None
    return llama_cpp


def quantize(src: Path, dst: Path, llama_ftype: str) -> None:
    """llama.cpp's quantizer, from the f16 file (it refuses to requantize q8_0). Tensors whose rows
    a K-quant's 256-wide blocks do not tile fall back to another type (the manifest counts them)."""
    import ctypes

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{llama_ftype}")
    params.nthread = len(os.sched_getaffinity(0))
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise PipelineError(f"{src}: llama.cpp could not quantize it to {llama_ftype}")


def tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return dict(sorted(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).items()))


# Ollama runs Go templates, never the Jinja in the GGUF. The ChatML one below (ranging over
# .Messages, Ollama's SYSTEM prepended as a system message when a conversation has none, as the
# Jinja templates do with their default system prompt) was checked with Go's text/template
# against transformers' rendering of the same conversations, byte for byte.
CHATML_GO_TEMPLATE = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
CHATML_STOPS = ("<|im_start|>", "<|im_end|>")
_PROBES = (
    [{"role": "user", "content": "U"}],
    [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}],
)


def _chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def chatml_system(tokenizer) -> str | None:
    """The default system prompt of a ChatML chat template ("" when it has none); None when the
    template is not ChatML, checked on conversations with and without a system message."""
    if not tokenizer.chat_template:
        return None
    try:
        render = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in _PROBES]
        with_system = [[{"role": "system", "content": "S"}, *m] for m in _PROBES]
        if [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in with_system] != [
            _chatml(m) for m in with_system
        ]:
            return None
    except Exception:  # noqa: BLE001 (a template may reject a probe's roles: then it is not plain ChatML)
        return None
    head, tail = "<|im_start|>system\n", "<|im_end|>\n" + _chatml(_PROBES[0])
    if render[0] == _chatml(_PROBES[0]):
        system = ""
    elif render[0].startswith(head) and render[0].endswith(tail):
        system = render[0][len(head) : -len(tail)]
    else:
        return None
    default = [{"role": "system", "content": system}] if system else []
    return system if render == [_chatml(default + m) for m in _PROBES] else None


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise PipelineError(f"the chat template's {what} holds '\"\"\"', which an Ollama Modelfile cannot quote")
    return f'"""{text}"""'


def ollama_modelfile(tokenizer, gguf_file: str) -> tuple[str, dict[str, Any]]:
    """The Modelfile serving `gguf_file` (beside it), and what it holds for the manifest. A ChatML
    chat template becomes Ollama's Go template with its default system prompt; any other is left to
    Ollama, which maps the GGUF's Jinja to the closest of its built-in templates (a comment says so)."""
    system = chatml_system(tokenizer)
    lines = [f"FROM ./{gguf_file}"]
    if system is None:
        log.warning("the chat template is not ChatML: the Modelfile leaves the prompt template to Ollama's guess")
        lines.insert(0, "# Not a ChatML chat template: Ollama picks its template from the GGUF's (see `ollama show --template`).")
        stops = (tokenizer.eos_token,)
    else:
        lines.append(f"TEMPLATE {_quoted(CHATML_GO_TEMPLATE, 'template')}")
        if system:
            lines.append(f"SYSTEM {_quoted(system, 'default system prompt')}")
        stops = CHATML_STOPS
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    about = {"template": "ollama's choice" if system is None else "chatml", "system": system, "stop": list(stops)}
    return "\n".join(lines) + "\n", about


def export_gguf(
    model_dir: str | Path,
    out_dir: str | Path,
    name: str,
    gguf: list[str] | tuple[str, ...],
    serve: str = "q8_0",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """`name-<type>.gguf` for each type of `gguf`, a Modelfile serving the `serve` one and
    manifest.json, in `out_dir`, all or nothing; returns the manifest."""
    settings = ExportSettings.from_config({"gguf": list(gguf), "serve": serve})
    if not settings.gguf:
        raise PipelineError("config key 'export.gguf': no GGUF type to export")
    quantized = [t for t in settings.gguf if GGUF_TYPES[t].llama_ftype]
    if quantized:
        llama_cpp = _llama_cpp()  # before converting anything, so a missing quantizer fails fast
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PipelineError(f"{model_dir}: not a model directory (no config.json)")
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    converter = converter_dir()
    files: dict[str, dict[str, Any]] = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        outputs = {GGUF_TYPES[t].outtype: tmp / settings.file(name, t) for t in settings.gguf if GGUF_TYPES[t].outtype}
        scratch = tmp / "quantized-from.f16.gguf"
        if quantized:
            # llama.cpp quantizes from f16, made for that alone when not asked for.
            outputs.setdefault("f16", scratch)
        convert(converter, model_dir, outputs, name)
        for gguf_type in quantized:
            quantize(outputs["f16"], tmp / settings.file(name, gguf_type), GGUF_TYPES[gguf_type].llama_ftype)
        scratch.unlink(missing_ok=True)
        for gguf_type in settings.gguf:
            path = tmp / settings.file(name, gguf_type)
            files[path.name] = {"type": gguf_type, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
            if gguf_type in quantized:
                files[path.name]["tensor_types"] = tensor_types(path)
        modelfile, about = ollama_modelfile(tokenizer, settings.file(name))
        (tmp / "Modelfile").write_text(modelfile, encoding="utf-8")
        manifest = {
            "model": str(model_dir),
            "converter": {
                "package": CONVERTER_PACKAGE,
                "version": CONVERTER_VERSION,
                "sdist_sha256": CONVERTER_SHA256,
                "script": "vendor/llama.cpp/convert_hf_to_gguf.py",
            },
            "quantizer": {"llama_cpp_python": llama_cpp.__version__} if quantized else None,
            "files": files,
            "modelfile": {"serves": settings.file(name), **about},
        }
        write_json(tmp / "manifest.json", manifest)
    log.info("exported %s as %s", model_dir, ", ".join(files))
    return manifest
