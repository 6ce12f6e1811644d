# Explainable image classification on TorchServe: prediction + DVE + targeted DVE.
#   make serve   install what is missing, build the default archive, start TorchServe
#   make stop    stop it (and the viewer page of make demo)
#   make demo    TorchServe if it is not running, and the viewer page on port PORT_BASE+3
#   make lint    ruff (lint, format) and mypy --strict on handler/; make test runs it first
#   make test    unit and integration tests (starts its own TorchServe on other ports)
#   make bench   what explaining costs next to the prediction, measured side by side
#   make loadtest  Locust load test and served comparison with the stock handler
#   make faults / make soak   faults under load; a long run at the documented load
#   make worstcase  the most expensive requests the limits allow, alone and as a full batch
#   make overload  4, 64, 200 users against one worker: latency of admitted requests, share rejected (503)
#   make evaluate  how faithful the explanations are (deletion/insertion, pointing game)
#   make figures   the paper's Fig. 4/5 (grid) and Fig. 6 (blur sweep) as PNGs in build/figures/
#   make stages  Fig. 7: DVE at every stage of the model, build/figures/stages.png

# The Python to build the environment with; unset, scripts/prereqs.sh takes the first
# of python3.11, python3.12 and python3 that is 3.11 or 3.12.
PYTHON ?=
VENV ?= .venv
# Every port this project opens moves with PORT_BASE (N): the server's inference N,
# management N+1, metrics N+2, the demo page N+3, gRPC N+4 and N+5; the tests' servers
# N+10100.., the load tests' N+20000.. Unset: config.properties' ports (8080, 8081, 8082;
# gRPC 7070, 7071) and the bases as if N were 8080.
PORT_BASE ?=
export PORT_BASE
PY := $(VENV)/bin/python
HANDLER_SOURCES := $(wildcard handler/*.py)

.PHONY: prereqs serve demo stop lint test bench gpu-bundle gpu-check evaluate figures stages loadtest scaling faults soak worstcase overload install install-dev archives samples clean

# Python 3.11/3.12, Java 17+ and the disk an install needs, each missing one named in a
# line, before anything is installed; creates the environment if it is not there.
prereqs:
	@PYTHON="$(PYTHON)" bash scripts/prereqs.sh $(VENV)

# The project itself, editable (its packages import from the checkout, no path edits),
# with the dependencies pyproject.toml lists: runtime ones, then the dev extra's.
$(VENV)/.runtime: pyproject.toml | prereqs
	$(PY) -m pip install --disable-pip-version-check -q -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

model_store/efficientnet_lite0.mar: $(VENV)/.runtime $(HANDLER_SOURCES) scripts/build_mar.py serving/archive.py
	$(PY) scripts/build_mar.py efficientnet_lite0

archives: model_store/efficientnet_lite0.mar

samples: $(VENV)/.runtime
	@$(PY) scripts/samples.py > /dev/null

serve: archives samples
	$(PY) scripts/server.py start --models efficientnet_lite0

# The viewer page (viewer/index.html) at http://127.0.0.1:PORT_BASE+3/ (8083), in front of
# the TorchServe of make serve (started here unless it runs); its pid file and log in build/demo/.
demo: archives samples
	$(PY) -m viewer.server start

stop:
	@if test -x $(PY); then $(PY) -m viewer.server stop; $(PY) scripts/server.py stop; else echo "nothing to stop"; fi

# ruff (lint and format) on everything, mypy --strict on handler/ (settings in pyproject.toml).
lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Lint first, then the suite. pytest exits 5 when it collected no test: that is a failure
# here, never a pass.
test: lint
	$(PY) -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; fi; exit $$rc

# Locust against a TorchServe it starts itself: the mix, then the side-by-side comparison
# with TorchServe's stock handler. Report in build/loadtest/<time>/; fails on any failure.
USERS ?= 4
SPAWN_RATE ?= 4
DURATION ?= 2m
loadtest: $(VENV)/.dev
	$(PY) loadtest/run.py --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION)

# How latency, throughput and response size grow with photo size and concurrent users.
scaling: $(VENV)/.dev
	$(PY) loadtest/scaling.py

# Faults under load: a worker killed, the server restarted, a request timing out.
faults: $(VENV)/.dev
	$(PY) loadtest/faults.py kill-worker
	$(PY) loadtest/faults.py restart
	$(PY) loadtest/faults.py timeout

# The documented load for SOAK_MINUTES; fails on any failed request or worker restart.
SOAK_MINUTES ?= 10
soak: $(VENV)/.dev
	$(PY) loadtest/faults.py soak --minutes $(SOAK_MINUTES)

# The most expensive request each option allows on the largest image the limits allow, alone
# and as a full batch, against a real TorchServe; fails if one is over its time or memory budget.
worstcase: $(VENV)/.dev
	$(PY) loadtest/worstcase.py

# The GPU check: on a machine with an NVIDIA GPU and only PyTorch, from the repository root
# with build/gpu (made here by `make gpu-bundle`): bash scripts/gpu_check.sh OUT_DIR
gpu-bundle: $(VENV)/.dev
	$(PY) scripts/gpu_bundle.py

gpu-check:
	bash scripts/gpu_check.sh build/gpu-check

# More users than one worker can serve, with TorchServe's default job_queue_size (100) and
# config.properties' one: p50/p99 and throughput of admitted requests, share rejected with
# 503, other 5xx, worker restarts (users do not retry here). Report in build/overload/<time>/.
# Other queue sizes: make overload OVERLOAD_ARGS="--queue-sizes 100 32 16 8"
OVERLOAD_ARGS ?=
overload: $(VENV)/.dev
	$(PY) loadtest/overload.py $(OVERLOAD_ARGS)

# In-process cost of DVE next to the forward pass (CPU here; CUDA where there is one).
bench: $(VENV)/.dev
	$(PY) scripts/bench.py

# Faithfulness of DVE, targeted DVE, a parameter sweep, Grad-CAM and two baselines on
# EfficientNet-Lite0's real weights; report in build/evaluation/ (8-9 min on 2 cores).
evaluate: $(VENV)/.dev
	$(PY) scripts/evaluate.py

# The paper's figures with EfficientNet-Lite0's real weights (no archive, no server needed):
# Fig. 4/5, crop, DVE, targeted DVE + box and Grad-CAM per photo, right or wrong; Fig. 6,
# prediction and explanation against Gaussian blur. Other photos and models: scripts/figures.py --help.
figures: $(VENV)/.dev
	$(PY) scripts/figures.py grid --out build/figures/grid.png
	$(PY) scripts/figures.py blur --out build/figures/blur.png

# Fig. 7 of the paper: DVE at every stage (VGG-16: pool1..pool5), one row per photo.
# Another model: make stages STAGES_ARGS="--model vgg16 --weights vgg16-397923af.pth"
STAGES_ARGS ?=
stages: $(VENV)/.dev
	$(PY) scripts/stages.py --out build/figures/stages.png $(STAGES_ARGS)

clean:
	rm -rf build model_store .pytest_cache
