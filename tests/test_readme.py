"""Every shell command the README shows is run here, so the README cannot drift from the code:
Snakemake commands as dry runs (or, where a dry run means nothing, on the smoke sweep's results),
`make` targets through `make -n` and the command they run, the rest as written on tiny inputs.
A command this file does not know how to check fails the test: add it to `check` below."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow


def readme_commands() -> list[list[str]]:
    """The commands of the README's ```bash blocks, as argument lists (comments and line continuations resolved)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if tokens := shlex.split(line, comments=True):
                commands.append(tokens)
    return commands


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, sweep_run) -> Path:
    """A copy of the repository, as a fresh clone has it (its tracked and unignored files, the venv
    linked in, ../shared beside it), with `my.yaml`, the user's own config of the README, and the
    demo's models and adapter standing in as the smoke sweep's tiny ones."""
    root = tmp_path_factory.mktemp("readme")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True)
    work = root / "repo"
    for name in filter(None, files.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes((REPO / name).read_bytes())
            (work / name).chmod((REPO / name).stat().st_mode)
    # A repository of its own, as a clone is (bench/mutations.py lists its files through git).
    for git in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "readme"]):
        subprocess.run(["git", *git], cwd=work, check=True)
    (work / ".venv").symlink_to(Path(sys.executable).parents[1])
    (root / "shared").symlink_to(REPO.parent / "shared")
    # The smoke sweep's config, its relative paths made absolute.
    mine = yaml.safe_load((sweep_run[0] / "smoke.yaml").read_text())
    mine["data"]["mirror_dir"] = str(sweep_run[0] / mine["data"]["mirror_dir"])
    for dataset in mine["datasets"].values():
        if "path" in dataset:
            dataset["path"] = str(sweep_run[0] / dataset["path"])
    (work / "my.yaml").write_text(yaml.safe_dump(mine))
    smoke = sweep_run[0] / "results"
    for demo, tiny in (
        ("models/merged/demo", "models/merged/smoke"),
        ("models/base/smollm2-135m-instruct", "models/base/tiny"),
        ("train/demo/adapter", "train/smoke/adapter"),
    ):
        (work / "results" / demo).parent.mkdir(parents=True, exist_ok=True)
        (work / "results" / demo).symlink_to(smoke / tiny)
    return work


def run(command: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **kwargs.pop("env", {})}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, **kwargs)
    assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def dry_run(command: list[str], cwd: Path) -> None:
    """A Snakemake command as a dry run: it must parse the config and plan the jobs it names."""
    planned = run([*command, "-n"], cwd).stdout
    assert "Job stats:" in planned or "Nothing to be done" in planned, planned


# Benchmarks run as written with a few extra arguments that make them small (their own defaults take minutes).
SMALL_BENCH = {
    "bench/data_throughput.py": ["--repeats", "1"],
    "bench/generation_throughput.py": ["--rows", "4", "--max-new-tokens", "4"],
    "bench/train_throughput.py": ["--rows", "8", "--steps", "1", "--variants", "sftpipe"],
    "bench/mutations.py": ["--only", "amx-not-native"],
    "bench/data_scaling.py": ["--rows", "300", "600"],
    "bench/results_page.py": [],
}


def check(command: list[str], workspace: Path, sweep: Path, tmp_path: Path) -> str:
    """Run one README command the way it can be checked here; return how it was checked."""
    head = command[0]
    if head == "make":
        printed = run(["make", "-n", *command[1:]], workspace).stdout
        if command[1:] in (["demo"], ["demo-dpo"], ["demo-rl"]):
            [line] = [line for line in printed.splitlines() if "bin/snakemake" in line]
            tokens = shlex.split(line)
            while "=" in tokens[0]:  # the HF_*_OFFLINE=1 assignments before the command
                tokens.pop(0)
            dry_run(tokens, workspace)
        return "make -n"
    if head == ".venv/bin/snakemake" and "--report" in command:
        # A report needs finished results: the smoke sweep's, under its own (tiny) config.
        report = command[command.index("--report") + 1]
        run(
            [
                sys.executable,
                "-m",
                "snakemake",
                "-s",
                str(workspace / "Snakefile"),
                "-d",
                str(sweep),
                "--report",
                report,
                "--configfile",
                str(sweep / "smoke.yaml"),
            ],
            sweep,
        )
        assert (sweep / report).stat().st_size > 0
        return "on the smoke sweep"
    if head == ".venv/bin/snakemake":
        dry_run(command, workspace)
        return "dry run"
    if head == ".venv/bin/python" and command[1:3] == ["-m", "sftpipe.generate"]:
        assert run(command, workspace).stdout.strip()
        return "as written"
    if head == ".venv/bin/python" and command[1:3] == ["-m", "sftpipe.plan"]:
        assert "| Llama-2-70B | 68.98B | QLoRA, NF4 base |" in run(command, workspace).stdout
        return "as written"
    if head == ".venv/bin/python" and command[1] in SMALL_BENCH:
        run([*command, *SMALL_BENCH[command[1]], "--out", str(tmp_path / "bench.json")], workspace)
        assert (tmp_path / "bench.json").stat().st_size > 0
        if command[1] == "bench/train_throughput.py":  # timed like TRL's variants: no evaluation while training
            assert json.loads((tmp_path / "bench.json").read_text())["variants"]["sftpipe"]["evaluations_while_training"] == 0
        return "small"
    if command[:2] == ["ollama", "create"]:
        # The demo's export, made from the smoke sweep's merged model that stands in for the demo's.
        from sftpipe.export import export_gguf

        modelfile = workspace / command[command.index("-f") + 1]
        export_gguf(workspace / "results" / "models" / "merged" / "demo", modelfile.parent, "demo", ["q8_0"])
        if shutil.which("ollama"):
            run(command, workspace)
            return "as written"
        [served] = [line.removeprefix("FROM ") for line in modelfile.read_text().splitlines() if line.startswith("FROM ")]
        assert (modelfile.parent / served).is_file()
        return "its Modelfile and the GGUF file it serves (no ollama here)"
    if command[:2] in (["sudo", "cluster/local-slurm.sh"], ["eval", "$(sudo cluster/local-slurm.sh start /tmp/slurm)"]):
        # tests/test_slurm.py installs, starts and stops the one-node SLURM the same way, and runs the profile on it.
        return "tests/test_slurm.py"
    raise AssertionError(f"the README shows `{shlex.join(command)}`, which tests/test_readme.py does not know how to check")


def test_the_readme_is_a_guide_under_15_kb():
    # Figures live on bench/RESULTS.md; the README stays a user's guide.
    assert (REPO / "README.md").stat().st_size < 15_000


def test_the_readme_shows_the_two_commands():
    assert ["make", "demo"] in COMMANDS and ["make", "test"] in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=[shlex.join(c)[:80] for c in COMMANDS])
def test_every_readme_command_runs(command, workspace, sweep_run, tmp_path):
    check(command, workspace, sweep_run[0], tmp_path)
