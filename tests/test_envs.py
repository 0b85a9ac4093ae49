"""Per-rule conda environments (`--sdm conda`) and code inputs agree with what each rule's script imports.

Each rule's script imports sftpipe modules, which import third-party packages (at module level or
inside functions). Following those imports gives, per rule, the sftpipe modules it runs and the
distributions it needs: the rule's `code()` inputs must list those modules (or editing one would
not rerun the rule), and its conda env must pin those distributions at pyproject.toml's versions.
"""

import ast
import re
import subprocess
import sys
import tempfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from conftest import REPO

# Needed at run time without being imported by name: transformers reads GGUF files through gguf
# and trains through accelerate; safetensors is the format every stage writes; llama.cpp's converter,
# which the export runs, reads models with torch and safetensors and tokenizers with sentencepiece.
RUNTIME_ONLY = {
    "train": {"gguf", "accelerate", "safetensors"},
    "eval": {"accelerate", "gguf"},
    "export": {"torch", "safetensors", "sentencepiece"},
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: list[str]) -> dict[str, str | None]:
    """name -> pinned version (None when unpinned)."""
    found = {}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        found[normalize(re.split(r"[<>=!~\[; ]", name)[0])] = version.strip() or None
    return found


def pyproject_pins(extra: str | None = None) -> dict[str, str | None]:
    """The project's dependencies, or those of one of its extras."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return pins(project["optional-dependencies"][extra] if extra else project["dependencies"])


# Imported only where installed, by a feature that says how to install it when missing (the q4_k_m
# GGUF type): PyPI ships llama-cpp-python as a source build of llama.cpp, too slow for an environment.
OPTIONAL = set(pyproject_pins("gguf"))
# Modules of the optional extras, by distribution: where an extra is not installed, the installed
# distributions cannot name them.
OPTIONAL_MODULES = {"llama_cpp": "llama-cpp-python"}


def env_pins(path: Path) -> tuple[dict[str, str | None], list]:
    spec = yaml.safe_load(path.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    return pins(pip), [d for d in spec["dependencies"] if isinstance(d, str)]


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(sftpipe modules, third-party top-level modules) imported anywhere in a file."""
    own, third = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [f"sftpipe.{node.module}" if node.level else node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "sftpipe":
                own.add(name.split(".")[1])
            elif top not in sys.stdlib_module_names:
                third.add(top)
    return own, third


def closure(script: Path) -> tuple[set[str], set[str]]:
    """The sftpipe modules a script runs and the third-party modules they import."""
    own, third = imports(script)
    todo = set(own)
    while todo:
        module_own, module_third = imports(REPO / "sftpipe" / f"{todo.pop()}.py")
        third |= module_third
        todo |= module_own - own
        own |= module_own
    return own, third


def planned_code_inputs() -> dict[str, set[str]]:
    """rule -> the sftpipe modules among its jobs' inputs, as Snakemake plans them (dry runs of the
    default and demo configs, and of the demo with preference tuning or RL, cover every rule)."""
    found: dict[str, set[str]] = {}
    for configs in (["config.yaml"], ["demo.yaml"], ["demo.yaml", "demo-dpo.yaml"], ["demo.yaml", "demo-rl.yaml"]):
        plan = subprocess.run(
            [
                sys.executable,
                "-m",
                "snakemake",
                "-s",
                str(REPO / "Snakefile"),
                "-n",
                "-d",
                tempfile.mkdtemp(),
                "--configfile",
                *(str(REPO / "config" / config) for config in configs),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        plan = plan.stdout + plan.stderr
        for rule, inputs in re.findall(r"^(?:local)?rule (\w+):\n    input: (.*)$", plan, re.M):
            found.setdefault(rule, set()).update(
                Path(path).stem for path in inputs.split(", ") if Path(path).parent == REPO / "sftpipe"
            )
    return found


def rules() -> list[dict]:
    """name, conda env, script and planned code inputs of every rule in rules/*.smk."""
    code = planned_code_inputs()
    found = []
    paths = sorted((REPO / "rules").glob("*.smk"))
    for path in paths:
        for block in re.split(r"^(?=rule \w+:)", path.read_text(), flags=re.M)[1:]:
            name = re.match(r"rule (\w+):", block)[1]
            found.append(
                {
                    "name": name,
                    "conda": re.search(r'conda:\s*"\.\./envs/(\w+)\.yaml"', block)[1],
                    "script": re.search(r'script:\s*"\.\./(scripts/\w+\.py)"', block)[1],
                    "code": code.get(name, set()),
                }
            )
    # `use rule A as B with:` runs A's script in A's environment (A may be in any file).
    for path in paths:
        for parent, child in re.findall(r"^use rule (\w+) as (\w+)", path.read_text(), re.M):
            [rule] = [r for r in found if r["name"] == parent]
            found.append({**rule, "name": child, "code": code.get(child, set())})
    return found


RULES = rules()


def test_every_rule_is_found():
    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            tempfile.mkdtemp(),
            "--list-rules",
            "--configfile",
            str(REPO / "config" / "demo.yaml"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    # Every rule Snakemake knows but the target rule runs a script, and each is checked below.
    assert sorted(r["name"] for r in RULES) == sorted(set(listed) - {"all"})
    assert all(r["code"] for r in RULES)


@pytest.mark.parametrize("rule", RULES, ids=[r["name"] for r in RULES])
def test_code_inputs_list_every_module_the_rule_runs(rule):
    own, _ = closure(REPO / rule["script"])
    # entry.py only wires Snakemake to the stage; editing it need not rerun results.
    assert own - {"entry"} <= rule["code"], f"{rule['name']}: add {sorted(own - {'entry'} - rule['code'])} to code()"


@pytest.mark.parametrize("rule", RULES, ids=[r["name"] for r in RULES])
def test_conda_env_pins_what_the_rule_imports(rule):
    env, _ = env_pins(REPO / "envs" / f"{rule['conda']}.yaml")
    _, third = closure(REPO / rule["script"])
    distributions = packages_distributions()
    needed = {normalize(d) for module in third for d in distributions.get(module, [OPTIONAL_MODULES.get(module, module)])}
    needed = (needed | RUNTIME_ONLY.get(rule["conda"], set())) - OPTIONAL
    assert needed - {"snakemake"} <= set(env), f"{rule['name']}: envs/{rule['conda']}.yaml lacks {sorted(needed - set(env))}"


@pytest.mark.parametrize("env_file", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_pins_agree_with_pyproject(env_file):
    project = pyproject_pins()
    env, conda = env_pins(env_file)
    for name, version in env.items():
        assert name in project, f"{env_file.name}: {name} is not a dependency in pyproject.toml"
        assert version == project[name], f"{env_file.name}: {name}=={version}, pyproject.toml has {project[name]}"
    # The same Python as the project's own, and the CPU torch pin (a loose torch pulls a CUDA build).
    assert "python=3.11" in conda and env.get("torch", "2.13.0") == "2.13.0"


@pytest.mark.parametrize("extra", [None, "test", "gguf"])
def test_pyproject_pins_every_dependency(extra):
    assert not [name for name, version in pyproject_pins(extra).items() if version is None]
