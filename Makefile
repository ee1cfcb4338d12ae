# The two commands a newcomer needs:  `make demo`  and  `make test`.  `make test-fast` is the
# developers' loop (lint + the tests not marked slow in two pytest workers, about 3 minutes on 2 cores).
# Both create .venv and install what they need from nothing. torch is pinned to 2.13.0 (the
# local CPU wheel on these machines); .ci/constraints.txt keeps any dependency from resolving
# a newer torch (which would pull gigabytes of CUDA wheels).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.dsmoe-installed
MODEL  ?= models/small
OUT    ?= out/small-ort

.NOTPARALLEL:  # the demo steps build on each other
.PHONY: install demo demo-model demo-export demo-agree demo-int4 demo-trained demo-experts demo-bench demo-mla test test-fast lint bench bench-quick bench-mla plugins clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml .ci/constraints.txt | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c .ci/constraints.txt "torch==2.13.0"
	$(PIP) install -q -c .ci/constraints.txt -e ".[test]"
	@touch $@

install: $(STAMP)

PROMPT ?= 1 17 42 7

# Each step is one dsmoe command; the demo fails (non-zero) at the first that does. Steps are
# listed in DEMO_STEPS so a later step (e.g. a trained model) is one more line there.
DEMO_STEPS = demo-model demo-export demo-agree demo-int4 demo-trained demo-experts demo-bench

demo: $(STAMP)
	@$(MAKE) --no-print-directory $(DEMO_STEPS)

demo-model: $(STAMP)
	@test -f $(MODEL)/config.json || $(VENV)/bin/dsmoe init $(MODEL) --preset small --seed 0
	$(VENV)/bin/dsmoe info $(MODEL)
	$(VENV)/bin/dsmoe inspect $(MODEL)

demo-export: $(STAMP)
	$(VENV)/bin/dsmoe-export $(MODEL) --out $(OUT) --verify --force

demo-agree: $(STAMP)
	@echo "--- greedy tokens: eager, fused graph, ONNX Runtime (dsmoe's loop), ONNX Runtime GenAI"
	$(VENV)/bin/dsmoe compare-backends $(MODEL) $(OUT) --prompt-ids "$(PROMPT)" --max-new-tokens 16

demo-int4: $(STAMP)
	@echo "--- int4 weights (QMoE + MatMulNBits): exactness checked, accuracy vs fp32 reported, then its tokens"
	$(VENV)/bin/dsmoe-export $(MODEL) --out $(OUT)-int4 --quant int4 --verify --force
	$(VENV)/bin/dsmoe generate $(OUT)-int4 --prompt-ids "$(PROMPT)" --max-new-tokens 16 --backend ort

demo-trained: $(STAMP)
	@echo "--- a trained DeepSeekMoE (assets/minimoe, docs/evaluation.md): its text, and its perplexity on held-out Python"
	$(VENV)/bin/dsmoe generate assets/minimoe --prompt "def " --max-new-tokens 40
	$(PY) -m dsmoe.train.corpus heldout code out/heldout-code.txt --max-bytes 20000 --force
	$(VENV)/bin/dsmoe eval assets/minimoe --text out/heldout-code.txt --ctx 256 --no-progress

demo-experts: $(STAMP)
	@echo "--- where the tokens go: expert load per layer, placement on 8 devices, plot"
	$(VENV)/bin/dsmoe experts $(MODEL) --random 8 --seq-len 64 --place 8 --plot out/experts-small.png --force

demo-bench: $(STAMP)
	$(VENV)/bin/dsmoe bench --quick --suite model --preset small --out out/bench --force

# DeepSeek-V2-style MLA model (latent KV cache, absorbed attention): the same steps on `mla-small`
MLA_MODEL ?= models/mla-small
MLA_OUT   ?= out/mla-small-ort

demo-mla: $(STAMP)
	@test -f $(MLA_MODEL)/config.json || $(VENV)/bin/dsmoe init $(MLA_MODEL) --preset mla-small --seed 0
	$(VENV)/bin/dsmoe info $(MLA_MODEL)
	$(VENV)/bin/dsmoe inspect $(MLA_MODEL)
	$(VENV)/bin/dsmoe-export $(MLA_MODEL) --out $(MLA_OUT) --verify --force
	@echo "--- greedy tokens: eager, fused graph (absorbed MLA), ONNX Runtime (GenAI cannot feed a latent cache)"
	$(VENV)/bin/dsmoe compare-backends $(MLA_MODEL) $(MLA_OUT) --prompt-ids "$(PROMPT)" --max-new-tokens 16 \
		--backend eager --backend fused --backend ort

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# the fast loop runs in JOBS pytest workers (pytest-xdist; 1.7x on 2 cores); `make test` stays serial
JOBS ?= 2

test-fast: lint
	$(PY) -m pytest -q -n $(JOBS) -m "not slow"

# the TensorRT plugin library (nvcc + the TensorRT headers; no GPU, no TensorRT); cached under build/
plugins: $(STAMP)
	$(VENV)/bin/dsmoe build-plugins --arch sm_80,sm_90 --out build/plugins --force

bench: $(STAMP)
	$(VENV)/bin/dsmoe bench --force

bench-quick: $(STAMP)
	$(VENV)/bin/dsmoe bench --quick --force

bench-mla: $(STAMP)
	$(PY) -m dsmoe.bench.mla_decode --force

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache out
