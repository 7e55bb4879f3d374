# Set-up and the everyday commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= data

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: install
	$(PY) -m pytest -q tests

# A short real experiment: plain vs residual MLPs of three depths on MNIST (about 20 s on 2 CPU cores).
demo: install
	$(PY) pipeline.py --model_name MLP --dataset MNIST --data_root $(DATA_ROOT) --num_hidden_layers 2 10 18 \
		--residual_step 0 2 --num_epochs 3 --limit_train 20000 --out_dir runs/demo --overwrite

bench: install
	$(PY) bench.py --data_root $(DATA_ROOT)

clean:
	rm -rf $(VENV) runs/demo
