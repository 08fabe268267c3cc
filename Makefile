# The README's commands. `make repro` and `make test` each set up a fresh machine first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBIAN_DATA := /usr/share/datasets/fashion-mnist
MLFLOW_PORT ?= 5000
MLFLOW_HOST ?= 127.0.0.1

.PHONY: help setup data-source repro verify test test-fast test-e2e test-services test-distributed test-browser lint server ui lock study study-quick \
	scheduler worker best fast seeds ingredients bench bench-workers bench-ddp bench-cluster bench-overhead drill profile

# `make help`: every target, one line each.
help: ## this list
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

# The ablation study: every variant x seed queued as a DVC experiment, run, recorded under
# reports/study/runs/<STUDY>/ as each finishes, then compared. Running it again skips what is
# recorded. Two queue workers with one torch thread each: faster than one worker with two
# threads on a 2-core machine (`make bench-workers` measures it). Override on the command line,
# e.g. `make study JOBS=1 THREADS=0 VARIANTS="baseline hidden256"`.
STUDY ?= ablation
SEEDS ?= 3
JOBS ?= 2
THREADS ?= 1
VARIANTS ?=
# SCHEDULER=tcp://HOST:8786: each run is a task on that Dask scheduler's workers, each in its
# own clone, instead of DVC's queue here (docs/team.md, "The study on many machines").
SCHEDULER ?=
STUDY_ARGS = --study $(STUDY) --seeds $(SEEDS) --jobs $(JOBS) --set train.num_threads=$(THREADS) \
	$(if $(VARIANTS),--variants $(VARIANTS),) $(if $(SCHEDULER),--scheduler $(SCHEDULER),)

setup: $(STAMP) data-source ## the venv from requirements.lock and a Fashion-MNIST source

# An existing venv is kept (only the packages are brought in line with the lock): recreating
# it in place with another interpreter than the one that made it would break it.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "error: '$(PYTHON) -m venv' failed; install Python 3.11 with venv (Debian:" \
	       "apt-get install python3.11-venv) or run make PYTHON=/path/to/python3.11" >&2; \
	  exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The download stage tries FASHION_MNIST_DIR, then Debian's package, then the official mirror.
# Installing the package is best effort: without root or apt, the mirror is used.
data-source: ## Debian's dataset-fashion-mnist when root and apt allow, else the mirror
	@if [ -n "$$FASHION_MNIST_DIR" ] || [ -f $(DEBIAN_DATA)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST source: $${FASHION_MNIST_DIR:-$(DEBIAN_DATA)}"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    dataset-fashion-mnist >/dev/null) \
	  || echo "dataset-fashion-mnist not installed; the download stage will use the mirror"; \
	else \
	  echo "No local Fashion-MNIST; the download stage will use the mirror"; \
	fi

repro: setup ## the pipeline: download, split, train, evaluate, report
	$(BIN)/dvc repro

# Reproduce (a no-op when up to date), then check each committed metric against this run:
# bit-identical, within the tolerance measured from seed noise, or FAIL (exit 1).
verify: repro ## reproduce, then check every committed metric (identical or within noise)
	$(BIN)/python -m fmnist_crnn.verify

# pytest exits 5 when it collects no test: that is a failure here, not a pass. The suite's
# tiers (tests/README.md): test-fast is the inner loop; test-e2e, test-services,
# test-distributed and test-browser each run the scenarios that need that component.
# PYTEST_ARGS passes more, e.g. `make test PYTEST_ARGS="-x -k team"`.
# Two pytest-xdist workers: the slow tiers mostly wait on processes they start. --dist
# loadscope keeps a module's tests on one worker, so a module-wide server, cluster or repository
# is started once (xdist's loadgroup ignored the xdist_group marks under pytest 9.2 here).
PYTEST_ARGS ?=
XDIST ?= -n 2 --dist loadscope
test: setup ## every test, every tier (tests/README.md gives the time of each)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS); status=$$?; \
	  if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

test-fast: setup ## the inner loop: no pipeline, server, cluster or browser (under a minute)
	$(BIN)/python -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-e2e: setup ## tier: the pipeline's stages as processes (dvc repro, dvc exp run)
	$(BIN)/python -m pytest -m e2e $(XDIST) $(PYTEST_ARGS)

test-services: setup ## tier: mlflow server, PostgreSQL, S3 on moto, mlflow models serve
	$(BIN)/python -m pytest -m services $(XDIST) $(PYTEST_ARGS)

test-distributed: setup ## tier: torchrun and the study on Dask
	$(BIN)/python -m pytest -m distributed $(XDIST) $(PYTEST_ARGS)

test-browser: setup ## tier: headless Chromium
	$(BIN)/python -m pytest -m browser $(XDIST) $(PYTEST_ARGS)

lint: setup ## ruff
	$(BIN)/ruff check src stages tests

# The team's tracking server: PostgreSQL backend, proxied artifacts, basic-auth; every setting
# and secret from the environment (docs/team.md).
server: setup ## the team's MLflow server (PostgreSQL, artifacts, basic-auth; docs/team.md)
	$(BIN)/python -m fmnist_crnn.server serve --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

# The committed study and recipe records are loaded first (seconds, no training; tagged
# imported=true), so a fresh clone compares them in the UI.
ui: setup ## load the committed study into MLflow and open its UI on MLFLOW_PORT
	$(BIN)/python -m fmnist_crnn.study publish
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 \
	  --port $(MLFLOW_PORT)

study: setup ## the ablation study, 10 variants x 3 seeds (SCHEDULER=tcp://... on Dask)
	$(BIN)/python -m fmnist_crnn.study run $(STUDY_ARGS)

# The Dask side of `make study SCHEDULER=...`: the scheduler on the head machine, one worker
# (one run at a time, one thread) on each other machine, from this checkout's environment.
scheduler: setup ## a Dask scheduler for `make study SCHEDULER=...`
	$(BIN)/dask scheduler --port 8786

worker: setup ## a Dask worker: make worker SCHEDULER=tcp://HOST:8786
	@test -n "$(SCHEDULER)" || { echo "error: say which scheduler: make worker SCHEDULER=tcp://HOST:8786" >&2; exit 2; }
	$(BIN)/dask worker $(SCHEDULER) --nworkers 1 --nthreads 1

# Cheap mode: 1 seed, 2 epochs on the first 6,000 training and test images.
study-quick: setup ## the study on 6,000 images, 2 epochs, 1 seed (minutes)
	$(BIN)/python -m fmnist_crnn.study run --study quick --seeds 1 --jobs $(JOBS) \
	  --set train.num_threads=$(THREADS) --epochs 2 --limit 6000

# The accuracy recipes (docs/accuracy.md; defined in src/fmnist_crnn/study/recipes.yaml):
# `make best` runs `dvc exp run -n best -S ...` in the workspace (SEED=43 for another seed),
# `make seeds RECIPE=best` seeds 42, 43, 44 one after another (timed runs share no CPU),
# recorded under reports/study/runs/best/; any recipe of recipes.yaml, archive included.
# `make ingredients EPOCHS=5` runs the ladder's cumulative steps (what each ingredient adds).
SEED ?=
RECIPE ?= best
EPOCHS ?= 5
best: setup ## the accuracy recipe, one run in the workspace (SEED=43 for another seed)
	$(BIN)/python -m fmnist_crnn.study recipe best $(if $(SEED),--seed $(SEED) --name best-s$(SEED),)

fast: setup ## the recipe without augmentation, 7 epochs (1x the default's time)
	$(BIN)/python -m fmnist_crnn.study recipe fast $(if $(SEED),--seed $(SEED) --name fast-s$(SEED),)

seeds: setup ## a recipe on 3 seeds, recorded and compared: make seeds RECIPE=fast
	$(BIN)/python -m fmnist_crnn.study run --study $(RECIPE) --variants $(RECIPE) \
	  --seeds $(SEEDS) --jobs 1 --reference

ingredients: setup ## the recipe's ladder, what each ingredient adds: make ingredients EPOCHS=5
	$(BIN)/python -m fmnist_crnn.study run --study ingredients-$(EPOCHS)ep --epochs $(EPOCHS) \
	  --variants baseline rows-crnn onecycle smoothing cropflip erasing ema-clip --jobs $(JOBS)

# Training images/s of the pipeline's loop against the study's DataLoader loop, inference
# throughput and latency: reports/bench/throughput.json. Needs the split (dvc repro split).
bench: setup ## training and inference throughput: reports/bench/throughput.json
	$(BIN)/dvc repro split
	PYTHONPATH=src $(BIN)/python benchmarks/throughput.py

# Multi-process training: 2 processes x 1 thread against 1 process x 2 threads.
bench-ddp: setup ## 2 processes x 1 thread against 1 x 2: reports/bench/ddp.json
	$(BIN)/dvc repro split
	PYTHONPATH=src $(BIN)/python benchmarks/ddp.py

# Where an epoch's time goes (conv blocks, LSTM, head, augmentation, optimizer, validation),
# for the default model and the accuracy recipe: reports/bench/profile-{default,best}.json.
profile: setup ## where an epoch's time goes: reports/bench/profile-*.json
	$(BIN)/dvc repro split
	PYTHONPATH=src $(BIN)/python benchmarks/profile_epoch.py
	PYTHONPATH=src $(BIN)/python benchmarks/profile_epoch.py --recipe best

# 2 queue workers x 1 thread against 1 worker x 2 threads: reports/bench/workers.json.
bench-workers: setup ## 2 workers x 1 thread against 1 x 2 and 2 x 2: reports/bench/workers.json
	$(BIN)/dvc repro split
	PYTHONPATH=src $(BIN)/python benchmarks/workers.py

# A tracked run's fixed cost: one slice `dvc exp run`, stage by stage, against commit AGAINST
# (default: the last commit before the cuts of issue 32) in the same invocation.
AGAINST ?= 5478e92
bench-overhead: setup ## a slice run's time outside training, stage by stage: reports/bench/overhead.json
	PYTHONPATH=src $(BIN)/python benchmarks/overhead.py $(if $(AGAINST),--against $(AGAINST),)

# The slice study on 1 Dask worker against 2, and on DVC's queue: reports/bench/cluster.json.
# A slice study on Dask with a fault of each kind on a fixed schedule: reports/bench/faults.json.
drill: setup ## the fault drill: one table of what was lost or done twice (10-15 min)
	PYTHONPATH=src $(BIN)/python benchmarks/faults.py

bench-cluster: setup ## the slice study on 1 and 2 Dask workers and DVC's queue
	PYTHONPATH=src $(BIN)/python benchmarks/cluster.py

lock: $(STAMP) ## rewrite requirements.lock from the venv
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^fmnist-crnn' > requirements.lock.new
	{ sed -n '1,2p' requirements.lock; cat requirements.lock.new; } > requirements.lock.tmp
	rm requirements.lock.new && mv requirements.lock.tmp requirements.lock
