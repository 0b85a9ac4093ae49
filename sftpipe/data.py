"""Download and hydrate stages: a dataset source to raw JSONL, raw JSONL to prompt/completion JSONL."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .demo import generate_demo_rows
from .formats import FORMATS, PRESETS, TEMPLATES, UserTemplate
from .io import (
    PipelineError,
    Progress,
    jsonl_line,
    numbered_jsonl,
    read_jsonl,
    remove_stale_temporaries,
    sha256_file,
    temporary_prefix,
    write_json,
    write_jsonl,
)

log = logging.getLogger("sftpipe")

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class DatasetSpec:
    """One configured dataset, with its preset's defaults filled in."""

    name: str
    format: str | None  # None only beside a user template
    template: str | dict[str, str] | None  # a named template, {prompt, completion} Jinja templates, None at download
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "train"
    revision: str | None = None
    path: str | None = None
    url: str | None = None
    sha256: str | None = None
    limit: int | None = None
    weight: float | None = None  # mixing: a fraction (<= 1) or a row count (> 1, upsampling if needed)
    seed: int = 0
    builtin: bool = False

    @classmethod
    def from_config(cls, name: str, cfg: dict[str, Any], *, template_required: bool = True) -> DatasetSpec:
        """The spec of `datasets.<name>`. The download stage, which gets the source keys alone (so a
        template edit never downloads again), passes `template_required=False`."""

        def where(key: str = "") -> str:
            return f"config key 'datasets.{name}{'.' if key else ''}{key}'"

        preset_name = cfg.get("preset")
        if preset_name is not None and preset_name not in PRESETS:
            raise PipelineError(f"{where('preset')}: unknown preset '{preset_name}' (known: {', '.join(sorted(PRESETS))})")
        preset = PRESETS.get(preset_name) if preset_name else None
        fmt = cfg.get("format") or (preset.format if preset else None)
        # The config's template, or the format's own.
        template = cfg.get("template") or (FORMATS[fmt].template if fmt in FORMATS else None)
        # A user template reads the raw row's own fields, so it needs no format; a format given
        # beside it still checks every row at download.
        format_optional = isinstance(template, dict) or not template_required
        if fmt is None and not format_optional:
            raise PipelineError(
                f"{where()}: give a 'preset', a 'format' (one of {', '.join(sorted(FORMATS))}) or a Jinja 'template' "
                "of your own ({prompt, completion})"
            )
        if fmt is not None and fmt not in FORMATS:
            raise PipelineError(f"{where('format')}: '{fmt}' is not one of {', '.join(sorted(FORMATS))}")
        if isinstance(template, dict):
            UserTemplate(name, template)  # a syntax error surfaces now, naming the key
        elif template not in TEMPLATES and (template_required or template is not None):
            raise PipelineError(f"{where('template')}: '{template}' is not one of {', '.join(sorted(TEMPLATES))}")
        given = [key for key in ("hub_id", "path", "url") if cfg.get(key)]
        if len(given) > 1:
            raise PipelineError(f"{where()}: give one source, not {' and '.join(repr(k) for k in given)}")
        if cfg.get("sha256") and not (cfg.get("url") or cfg.get("path")):
            raise PipelineError(f"{where('sha256')}: a pin needs a 'url' or a 'path' file; a Hub source is pinned by 'revision'")
        hub_id = cfg.get("hub_id") or (preset.hub_id if preset else None)
        builtin = preset_name == "sftpipe_demo"
        if not (builtin or hub_id or cfg.get("path") or cfg.get("url")):
            raise PipelineError(f"{where()}: give a 'preset', a 'hub_id', a local 'path' or a 'url'")
        return cls(
            name=name,
            format=fmt,
            template=template,
            hub_id=hub_id,
            hub_config=cfg.get("hub_config") or (preset.hub_config if preset else None),
            split=cfg.get("split") or (preset.split if preset else "train"),
            revision=cfg.get("revision"),
            path=cfg.get("path"),
            url=cfg.get("url"),
            sha256=cfg.get("sha256"),
            limit=cfg.get("limit"),
            weight=cfg.get("weight"),
            seed=cfg.get("seed", 0),
            builtin=builtin,
        )

    @property
    def from_hub(self) -> bool:
        """Read from the Hub, or from its copy in the mirror: no url, path or built-in generator."""
        return not (self.url or self.path or self.builtin)

    def renderer(self, model: str) -> str:
        """What renders the rows, which names the hydrated rows' directory, so that switching templates
        back and forth finds the earlier rendering: the named template, `chat-<model>` for a base
        model's own chat template, or `user-<hash>` for the config's own Jinja templates."""
        if isinstance(self.template, dict):
            return "user-" + hashlib.sha256(json.dumps(self.template, sort_keys=True).encode()).hexdigest()[:12]
        return f"chat-{model}" if self.template == "chat" else self.template


def read_local_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a local json/jsonl/parquet/csv file, or of every such file in a directory (sorted)."""
    return (row for _, row in located_rows(path))


def located_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of a local file or directory; `where` names the file and the line
    (jsonl, csv), element (json) or row (parquet), for errors."""
    if path.is_dir():
        files = _data_files(path)
        if not files:
            raise PipelineError(f"{path}: directory holds no {'/'.join(LOCAL_SUFFIXES)} file")
        for file in files:
            yield from located_rows(file)
        return
    if not path.exists():
        raise PipelineError(f"{path}: file not found")
    suffix = path.suffix
    if suffix == ".jsonl":
        yield from ((f"{path}:{lineno}", row) for lineno, row in numbered_jsonl(path))
    elif suffix == ".json":
        yield from _read_json_array(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".csv":
        yield from _read_csv(path)
    else:
        raise PipelineError(f"{path}: unsupported file type '{suffix}' (use one of {', '.join(LOCAL_SUFFIXES)})")


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise PipelineError(f"{path}:{line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise PipelineError(f"{path}: empty file")
    return text


def _read_json_array(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        rows = json.loads(_decode(path))
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(rows, list):
        raise PipelineError(f"{path}: expected a JSON array of objects, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PipelineError(f"{path}: element {i} is {type(row).__name__}, expected an object")
        yield f"{path}: element {i}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                yield f"{path}: row {index}", row
                index += 1
    except (pyarrow.ArrowException, OSError) as err:
        raise PipelineError(f"{path}: not a readable parquet file ({err})") from None


def _read_csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(_decode(path)))
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise PipelineError(f"{where}: more fields than the header's {len(reader.fieldnames)}")
        if None in row.values():
            raise PipelineError(f"{where}: fewer fields than the header's {len(reader.fieldnames)}")
        yield where, row


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in LOCAL_SUFFIXES)


def local_source(spec: DatasetSpec, mirror_dir: str | None) -> Path | None:
    """The local file or directory a dataset is read from: its `path`, or its copy in the mirror;
    None for a URL, the built-in demo or the Hub."""
    if spec.path:
        return Path(spec.path)
    if not (spec.from_hub and mirror_dir):
        return None
    return mirror_location(Path(mirror_dir), spec.hub_id, spec.hub_config, spec.split)


def local_source_files(spec: DatasetSpec, mirror_dir: str | None) -> list[Path]:
    """The files of `local_source`, as the workflow's inputs: editing them reruns the download and all
    after it. None for a missing path, so that the download itself reports it."""
    path = local_source(spec, mirror_dir)
    return source_files(path) if path is not None and path.exists() else []


def source_files(path: Path) -> list[Path]:
    """The files a local source reads: the file itself, or a directory's data files in name order."""
    return _data_files(path) if path.is_dir() else [path]


def mirror_location(mirror_dir: Path, hub_id: str, hub_config: str | None, split: str) -> Path | None:
    """`<mirror>/<hub_id>/[<config>/]<split>.<ext>` (or a `<split>/` directory) if it exists."""
    base = mirror_dir / hub_id / hub_config if hub_config else mirror_dir / hub_id
    for candidate in [base / f"{split}{suffix}" for suffix in LOCAL_SUFFIXES] + [base / split]:
        if candidate.exists():
            return candidate
    return None


def _hub_rows(spec: DatasetSpec, revision: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    # Streaming reads only the rows we keep: Dolphin's files are several GB.
    import datasets

    try:
        stream = datasets.load_dataset(spec.hub_id, name=spec.hub_config, split=spec.split, revision=revision, streaming=True)
    except datasets.exceptions.DatasetNotFoundError as err:
        raise _hub_access_error(spec, err) from None
    for index, row in enumerate(stream):
        yield f"{spec.hub_id} ({spec.split}) row {index}", row


def _hub_access_error(spec: DatasetSpec, err: Exception) -> PipelineError:
    """What a user can do about a Hub dataset they cannot read: check the id, or accept its terms and
    give a token."""
    return PipelineError(
        f"config key 'datasets.{spec.name}.hub_id': cannot read '{spec.hub_id}' from the Hub ({str(err).splitlines()[0]}); "
        "check the id, or, for a gated or private dataset, accept its terms on the Hub and set HF_TOKEN"
    )


def _resolve_hub_revision(spec: DatasetSpec) -> str | None:
    """The commit `spec.revision` (a branch or tag, or None for main) points at now, so that the rows
    read and the manifest name the same commit."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().dataset_info(spec.hub_id, revision=spec.revision).sha
    except RevisionNotFoundError:
        raise PipelineError(
            f"config key 'datasets.{spec.name}.revision': '{spec.revision}' is not a revision of {spec.hub_id}"
        ) from None
    except (GatedRepoError, RepositoryNotFoundError) as err:  # the Hub answered: not for this user
        raise _hub_access_error(spec, err) from None
    except Exception as err:  # offline, or a local dataset directory: read what was asked for
        log.warning("could not resolve the Hub revision of %s: %s", spec.hub_id, err)
        return spec.revision


def _check_pin(spec: DatasetSpec, location: str, digest: str) -> None:
    if spec.sha256 and digest != spec.sha256.lower():
        raise PipelineError(
            f"config key 'datasets.{spec.name}.sha256': {location} has sha256 {digest}, the config pins {spec.sha256}"
        )


def fetch_url(spec: DatasetSpec, directory: Path) -> tuple[Path, str]:
    """Download `spec.url` into `directory`; check the sha256 pin if there is one. Return (file, sha256)."""
    import urllib.parse
    import urllib.request

    suffix = Path(urllib.parse.urlparse(spec.url).path).suffix
    if suffix not in LOCAL_SUFFIXES:
        raise PipelineError(
            f"config key 'datasets.{spec.name}.url': cannot tell the file type of {spec.url} "
            f"(the path must end in one of {', '.join(LOCAL_SUFFIXES)})"
        )
    target = directory / f"download{suffix}"
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as response, target.open("wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except OSError as err:
        raise PipelineError(f"config key 'datasets.{spec.name}.url': could not download {spec.url}: {err}") from None
    _check_pin(spec, spec.url, digest.hexdigest())
    return target, digest.hexdigest()


def download_dataset(spec: DatasetSpec, out_path: str | Path, manifest_path: str | Path, mirror_dir: str | None) -> dict:
    """Write the first `limit` rows of the dataset's source to `out_path`, and a manifest of where they came from."""
    # A scratch directory named like the rows' own temporaries, so a later run removes it if this one is killed.
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(Path(out_path), "scratch")
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent, prefix=temporary_prefix(Path(out_path), "scratch")) as scratch:
        return _download(spec, out_path, manifest_path, mirror_dir, Path(scratch))


def _download(spec: DatasetSpec, out_path, manifest_path, mirror_dir: str | None, scratch: Path) -> dict:
    local = local_source(spec, mirror_dir)
    if spec.url:
        file, digest = fetch_url(spec, scratch)
        source = {"kind": "url", "url": spec.url, "sha256": digest}
        rows: Iterator[tuple[str, dict[str, Any]]] = located_rows(file)
    elif spec.builtin:
        source = {"kind": "builtin", "generator": "sftpipe.demo", "seed": spec.seed}
        rows = ((f"sftpipe.demo row {i}", row) for i, row in enumerate(generate_demo_rows(spec.limit or 2000, seed=spec.seed)))
    elif local is not None:
        if spec.path:
            source = {"kind": "local", "path": str(local.resolve())}
            if spec.sha256:
                if not local.is_file():
                    raise PipelineError(f"config key 'datasets.{spec.name}.sha256': {local} is not a file")
                _check_pin(spec, str(local), sha256_file(local))
        else:
            source = {"kind": "mirror", "hub_id": spec.hub_id, "path": str(local.resolve())}
        rows = located_rows(local)
    else:
        revision = _resolve_hub_revision(spec)
        source = {"kind": "hub", "hub_id": spec.hub_id, "config": spec.hub_config, "split": spec.split, "revision": revision}
        rows = _hub_rows(spec, revision)

    progress = Progress(f"download {spec.name}", spec.limit)
    parse = FORMATS[spec.format].parse if spec.format in FORMATS else None

    def checked() -> Iterator[dict[str, Any]]:
        # The format's parser checks each row where the user can find it: in their own file.
        for i, (where, row) in enumerate(rows):
            if spec.limit is not None and i >= spec.limit:
                return
            if parse is not None:
                parse(row, f"{where} (dataset '{spec.name}', format '{spec.format}')")
            progress.update()
            yield row

    location = source.get("path") or source.get("hub_id") or source["kind"]
    count = write_jsonl(out_path, checked(), if_empty=f"dataset '{spec.name}': source {location} has no rows")
    manifest = {
        "name": spec.name,
        "source": source,
        "rows": count,
        "sha256": sha256_file(out_path),
        # What the download read; the template and the weight are later stages' business.
        "spec": {k: v for k, v in asdict(spec).items() if k not in ("template", "weight")},
    }
    write_json(manifest_path, manifest)
    log.info("dataset %s: %d rows from %s", spec.name, count, source["kind"])
    return manifest


def chat_renderer(tokenizer) -> Callable[[list[dict[str, str]]], str]:
    """The tokenizer's chat template as a function of the messages, ending where the assistant answers."""

    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return render


def load_chat_template(tokenizer_dir: str | Path) -> Callable[[list[dict[str, str]]], str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not tokenizer.chat_template:
        raise PipelineError(f"{tokenizer_dir}: the tokenizer has no chat template; pick another 'template'")
    return chat_renderer(tokenizer)


def row_identity(dataset: str, row: dict[str, Any], repeats: Counter[str]) -> str:
    """`<dataset>-<id>` from the row's own `id`, else from a hash of its content: never its position,
    so inserting, removing or reordering rows upstream leaves every other row's id, hence its split,
    as it was. The dataset prefix keeps equal ids of two datasets apart. `repeats` numbers identical
    rows (the filters' exact dedup then reports them)."""
    if row.get("id") is not None:
        return f"{dataset}-{row['id']}"
    key = hashlib.sha256(jsonl_line(row)).hexdigest()[:16]
    repeats[key] += 1
    return f"{dataset}-{key}" if repeats[key] == 1 else f"{dataset}-{key}-{repeats[key]}"


def hydrate_dataset(spec: DatasetSpec, raw_path: str | Path, out_path: str | Path, tokenizer_dir: str | None = None) -> int:
    """Render every raw row into `{id, source_id, dataset, prompt, completion, content}`; return the row count.

    `content` is the row's own text without the template, for dedup and decontamination.

    A multi-turn row gives one row per assistant turn (its history in the prompt); they share the
    `source_id` that the split hashes, so a conversation never straddles train and test.
    """
    if isinstance(spec.template, dict):
        user_template = UserTemplate(spec.name, spec.template)

        def render_row(row: dict[str, Any], where: str) -> list[tuple[str, str, str]]:
            content = "\n".join(v for v in row.values() if isinstance(v, str))
            return [(*user_template.render(row, where), content)]

    else:
        parse, render = FORMATS[spec.format].parse, TEMPLATES[spec.template]
        chat_template = load_chat_template(tokenizer_dir) if spec.template == "chat" else None

        def render_row(row: dict[str, Any], where: str) -> list[tuple[str, str, str]]:
            return [(*render(ex, where, chat_template), ex.content()) for ex in parse(row, where)]

    def rows() -> Iterator[dict[str, Any]]:
        repeats: Counter[str] = Counter()
        for index, row in enumerate(read_jsonl(raw_path)):
            where = f"{raw_path}:{index + 1} (dataset '{spec.name}')"
            row_id = row_identity(spec.name, row, repeats)
            turns = render_row(row, where)
            for turn, (prompt, completion, content) in enumerate(turns):
                if not completion.strip():
                    # Real datasets have a few (Alpaca: 2 in 5,000): nothing to learn, so skip them in the open.
                    log.warning("%s: empty completion, row skipped", where)
                    continue
                yield {
                    "id": row_id if len(turns) == 1 else f"{row_id}-t{turn}",
                    "source_id": row_id,
                    "dataset": spec.name,
                    "prompt": prompt,
                    "completion": completion,
                    "content": content,
                }

    return write_jsonl(out_path, rows(), if_empty=f"{raw_path}: no rows to hydrate")
