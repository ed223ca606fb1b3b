# The two quickstart commands are `make run` and `make test`; the rest are their parts.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run demo test lint tiny-model redis clean

# Debian ships venv's bootstrap (ensurepip) apart, as python3-venv: installed when missing.
$(BIN)/activate:
	$(PYTHON) -m venv $(VENV) || { \
		rm -rf $(VENV); echo "python: installing Debian's python3-venv"; \
		sudo_cmd=""; [ "$$(id -u)" -ne 0 ] && sudo_cmd=sudo; \
		$$sudo_cmd apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo_cmd apt-get install -y -qq python3-venv >/dev/null && \
		$(PYTHON) -m venv $(VENV); }

$(VENV)/.installed: requirements.txt requirements-dev.txt | $(BIN)/activate
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed  ## create .venv and install everything

redis:  ## start a local Redis if none answers at REDIS_URL
	scripts/ensure-redis.sh

tiny-model: setup  ## build a tiny random model in models/tiny for offline trials
	$(BIN)/python -m worker.tiny_model models/tiny

# honcho hands PORT to the first process (web); without -p it would pick 5000.
HONCHO := PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start --port $${PORT:-8000}

run: setup redis  ## webhook, worker and flower in the foreground (Ctrl-C stops all)
	$(HONCHO) -f Procfile

models/tiny/config.json:
	$(MAKE) tiny-model

demo: setup redis models/tiny/config.json  ## offline: tiny model + a local receiver printing replies
	# honcho would let .env override these; the processes still read .env for the rest
	# (pydantic-settings: real environment first, then .env).
	MODEL_NAME=models/tiny N8N_CALLBACK_URL=http://127.0.0.1:9000/reply \
		$(HONCHO) --env /dev/null -f Procfile.demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup redis lint  ## lint, then the whole test suite (unit and end-to-end)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

.PHONY: bench bench-generation
bench: setup redis  ## benchmarks of webhook, pipeline, memory, callbacks, tasks, instructions (BENCHMARKS.md)
	$(BIN)/python -m bench.webhook_throughput
	$(BIN)/python -m bench.pipeline_overhead
	$(BIN)/python -m bench.pipeline_overhead --conversations 8 --think-ms 50
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.callback_client
	$(BIN)/python -m bench.task_overhead
	@if command -v valgrind >/dev/null; then $(BIN)/python -m bench.instructions --variant python-redis-parser; \
	else echo "bench.instructions skipped: valgrind is not installed (apt-get install valgrind)"; fi

bench-generation: setup  ## naive against batched generation, DialoGPT shapes (~20 min)
	$(BIN)/python -m bench.generation --shapes small medium --dtype float32 bfloat16
	$(BIN)/python -m bench.sampling
	$(BIN)/python -m bench.linear_products
