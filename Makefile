# The README's commands. `make repro` and `make test` each set up a fresh machine first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBIAN_DATA := /usr/share/datasets/fashion-mnist
MLFLOW_PORT ?= 5000
MLFLOW_HOST ?= 127.0.0.1

.PHONY: setup data-source repro verify test test-fast lint server ui lock study study-quick \
	scheduler worker bench-cluster \
	best best-seeds fast ingredients bench bench-workers bench-ddp profile fast-seeds best-all-seeds \
	best-fp32-seeds best-bf16-seeds best-tta-seeds

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

setup: $(STAMP) data-source

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
data-source:
	@if [ -n "$$FASHION_MNIST_DIR" ] || [ -f $(DEBIAN_DATA)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST source: $${FASHION_MNIST_DIR:-$(DEBIAN_DATA)}"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    dataset-fashion-mnist >/dev/null) \
	  || echo "dataset-fashion-mnist not installed; the download stage will use the mirror"; \
	else \
	  echo "No local Fashion-MNIST; the download stage will use the mirror"; \
	fi

repro: setup
	$(BIN)/dvc repro

# Reproduce (a no-op when up to date), then check each committed metric against this run:
# bit-identical, within the tolerance measured from seed noise, or FAIL (exit 1).
verify: repro
	$(BIN)/python -m fmnist_crnn.verify

# pytest exits 5 when it collects no test: that is a failure here, not a pass.
test: setup
	$(BIN)/python -m pytest; status=$$?; \
	  if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check src stages tests

# The team's tracking server: PostgreSQL backend, proxied artifacts, basic-auth; every setting
# and secret from the environment (docs/team.md).
server: setup
	$(BIN)/python -m fmnist_crnn.server serve --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

# The committed study and recipe records are loaded first (seconds, no training; tagged
# imported=true), so a fresh clone compares them in the UI.
ui: setup
	$(BIN)/python -m fmnist_crnn.study publish
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 \
	  --port $(MLFLOW_PORT)

study: setup
	$(BIN)/python -m fmnist_crnn.study run $(STUDY_ARGS)

# The Dask side of `make study SCHEDULER=...`: the scheduler on the head machine, one worker
# (one run at a time, one thread) on each other machine, from this checkout's environment.
scheduler: setup
	$(BIN)/dask scheduler --port 8786

worker: setup
	@test -n "$(SCHEDULER)" || { echo "error: say which scheduler: make worker SCHEDULER=tcp://HOST:8786" >&2; exit 2; }
	$(BIN)/dask worker $(SCHEDULER) --nworkers 1 --nthreads 1

# Cheap mode: 1 seed, 2 epochs on the first 6,000 training and test images.
study-quick: setup
	$(BIN)/python -m fmnist_crnn.study run --study quick --seeds 1 --jobs $(JOBS) \
	  --set train.num_threads=$(THREADS) --epochs 2 --limit 6000

# The accuracy recipe (docs/accuracy.md), defined in src/fmnist_crnn/study/recipes.yaml:
# `make best` runs `dvc exp run -n best-bf16val -S ...` in the workspace (SEED=43 for another
# seed): the ladder's last step in bfloat16 mixed precision (its per-epoch validation too),
# 60 epochs, scored on 10 test-time views. `make best-seeds` queues seeds 42, 43, 44 as
# best-bf16val-s42... and compares them; likewise `make fast-seeds`, `make best-all-seeds`
# (the recipe on all 60,000 training images), `make best-tta-seeds` (the same training,
# validated in float32), `make best-bf16-seeds` (that, scored with flip-only TTA) and `make
# best-fp32-seeds` (the earlier recipe: float32, 40 epochs); `make ingredients EPOCHS=5` runs
# the ladder's cumulative steps (what each ingredient adds).
SEED ?=
EPOCHS ?= 5
best: setup
	$(BIN)/python -m fmnist_crnn.study recipe best-bf16val \
	  $(if $(SEED),--seed $(SEED) --name best-bf16val-s$(SEED),)

# Time to accuracy: the recipe without augmentation, 7 epochs (`dvc exp run -n fast -S ...`).
fast: setup
	$(BIN)/python -m fmnist_crnn.study recipe fast $(if $(SEED),--seed $(SEED) --name fast-s$(SEED),)

best-seeds: setup
	$(BIN)/python -m fmnist_crnn.study run --study best-bf16val --variants best-bf16val \
	  --seeds 3 --jobs 1

best-tta-seeds: setup
	$(BIN)/python -m fmnist_crnn.study run --study best-tta --variants best-tta --seeds 3 --jobs 1

best-bf16-seeds: setup
	$(BIN)/python -m fmnist_crnn.study run --study best-bf16 --variants best-bf16 --seeds 3 --jobs 1

best-fp32-seeds: setup
	$(BIN)/python -m fmnist_crnn.study run --study best --variants best --seeds 3 --jobs 1

fast-seeds: setup
	$(BIN)/python -m fmnist_crnn.study run --study fast --variants fast --seeds 3 --jobs 1

best-all-seeds: setup
	$(BIN)/python -m fmnist_crnn.study run --study best-all --variants best-all --seeds 3 --jobs 1

ingredients: setup
	$(BIN)/python -m fmnist_crnn.study run --study ingredients-$(EPOCHS)ep --epochs $(EPOCHS) \
	  --variants baseline rows-crnn onecycle smoothing cropflip erasing best --jobs $(JOBS)

# Training images/s of the pipeline's loop against the study's DataLoader loop, inference
# throughput and latency: reports/bench/throughput.json. Needs the split (dvc repro split).
bench: setup
	$(BIN)/dvc repro split
	PYTHONPATH=src $(BIN)/python benchmarks/throughput.py

# Multi-process training: 2 processes x 1 thread against 1 process x 2 threads.
bench-ddp: setup
	$(BIN)/dvc repro split
	PYTHONPATH=src $(BIN)/python benchmarks/ddp.py

# Where an epoch's time goes (conv blocks, LSTM, head, augmentation, optimizer, validation),
# for the default model and the accuracy recipe: reports/bench/profile-{default,best}.json.
profile: setup
	$(BIN)/dvc repro split
	PYTHONPATH=src $(BIN)/python benchmarks/profile_epoch.py
	PYTHONPATH=src $(BIN)/python benchmarks/profile_epoch.py --recipe best

# 2 queue workers x 1 thread against 1 worker x 2 threads: reports/bench/workers.json.
bench-workers: setup
	$(BIN)/dvc repro split
	PYTHONPATH=src $(BIN)/python benchmarks/workers.py

# The slice study on 1 Dask worker against 2, and on DVC's queue: reports/bench/cluster.json.
bench-cluster: setup
	PYTHONPATH=src $(BIN)/python benchmarks/cluster.py

lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^fmnist-crnn' > requirements.lock.new
	{ sed -n '1,2p' requirements.lock; cat requirements.lock.new; } > requirements.lock.tmp
	rm requirements.lock.new && mv requirements.lock.tmp requirements.lock
