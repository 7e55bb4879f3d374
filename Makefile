# Set-up and the everyday commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= data
JOBS ?= $(shell nproc)
# make reproduce: where runs and figures go and the size of the lab (a test runs it at toy size: 1 epoch, a few
# hundred images, 1 seed, 2 depths). Left empty: the presets' depths, seeds and 10 epochs (--preset exercise1 and
# exercise2 in config.py), all training images, pipeline.py's 5,000 validation images.
RUNS ?= runs/reproduce
IMG_SHOW ?= img_show
EPOCHS ?=
IMAGES ?=
VAL_SIZE ?=
EX1_DEPTHS ?=
EX1_SEEDS ?=
EX1_GRADIENT_FIGURES ?= gradients_mlp_d22.png gradients_mlp_d34.png gradients_mlp_d34_res2.png \
	gradient_heatmap_mlp_mnist_h22_w16_plain_s0.png gradient_heatmap_mlp_mnist_h34_w16_plain_s0.png \
	gradient_heatmap_mlp_mnist_h34_w16_res2_s0.png mlp_init_gradient_vs_accuracy.png
EX2_CONVS ?=
EX2_SEEDS ?=
EX2_GRADIENT_FIGURES ?= Conv_gradients_d38.png gradient_heatmap_resnet_cifar10_d38_c16x3_plain_s0.png \
	gradient_heatmap_resnet_cifar10_d38_c16x3_res2_s0.png
FAITHFULNESS ?= 1000
EX1_FLAGS := $(if $(EX1_DEPTHS), --num_hidden_layers $(EX1_DEPTHS))$(if $(EX1_SEEDS), --seed $(EX1_SEEDS))
EX2_FLAGS := $(if $(EX2_CONVS), --num_conv_per_level $(EX2_CONVS))$(if $(EX2_SEEDS), --seed $(EX2_SEEDS))
SIZE := $(if $(EPOCHS), --num_epochs $(EPOCHS))$(if $(VAL_SIZE), --val_size $(VAL_SIZE))$(if $(IMAGES), \
	--limit_train $(IMAGES))

# Copy the gradient figures $(2) from the plots folder $(1) into IMG_SHOW; one the sweep did not draw (EX1_DEPTHS or
# EX2_CONVS left its depth out) is named, not copied.
copy_gradient_figures = for f in $(2); do if [ -f $(1)/$$f ]; then cp $(1)/$$f $(IMG_SHOW)/; else \
	echo "not copied: $(1)/$$f (this sweep did not draw it; set EX1_GRADIENT_FIGURES or EX2_GRADIENT_FIGURES)"; \
	fi; done

.PHONY: install test fuzz demo bench gpu-check clean reproduce reproduce-ex1 reproduce-ex2 reproduce-ex3 reproduce-fast \
	readme

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Two pytest-xdist workers; OpenMP threads that wait sleep instead of spinning, since two workers' torch threads
# share the cores (docs/testing.md).
test: install
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n 2 tests

# Every case of the fuzz, hostile command lines and damaged run folders (make test runs a seeded subset of each).
fuzz: install
	$(PY) -m pytest -q tests/test_fuzz.py --fuzz

# A short real experiment: plain vs residual MLPs of three depths on MNIST (about 20 s on 2 CPU cores).
demo: install
	$(PY) pipeline.py --model_name MLP --dataset MNIST --data_root $(DATA_ROOT) --num_hidden_layers 2 10 18 \
		--residual_step 0 2 --num_epochs 3 --limit_train 20000 --out_dir runs/demo --overwrite

# The whole lab on the real data (about 3 hours on 2 CPU cores). Interrupt it at any time: the same command
# continues every run from its last finished epoch. Figures go to $(IMG_SHOW)/, the tables are printed.
reproduce: reproduce-ex1 reproduce-ex2 reproduce-ex3
	$(PY) report.py --ex1 $(RUNS)/ex1 --ex2 $(RUNS)/ex2

# Exercise 1: 9 depths x plain/residual x 5 seeds = 90 MLPs on MNIST (4 minutes with --jobs 2 on 2 cores, 2026-11-28).
reproduce-ex1: install
	$(PY) pipeline.py --preset exercise1$(EX1_FLAGS)$(SIZE) \
		--data_root $(DATA_ROOT) --jobs $(JOBS) --out_dir $(RUNS)/ex1 --resume
	mkdir -p $(IMG_SHOW)
	cp $(addprefix $(RUNS)/ex1/plots/,mlp_training_loss.png mlp_Val_acc.png mlp_trainability.png) $(IMG_SHOW)/
	$(call copy_gradient_figures,$(RUNS)/ex1/plots,$(EX1_GRADIENT_FIGURES))
	$(PY) report.py --ex1 $(RUNS)/ex1

# Exercise 2: He et al.'s CIFAR family at depths 8, 20 and 38, plain and residual (option A shortcuts), seeds 0 to 2,
# 10 epochs of one-cycle SGD (about an hour a seed on 2 CPU cores). OpenMP threads that wait sleep instead of
# spinning: beside one busy process an epoch took 9.2 s instead of 13.1 s; on a quiet machine it costs 13%
# (docs/performance.md).
reproduce-ex2: install
	OMP_WAIT_POLICY=PASSIVE $(PY) pipeline.py --preset exercise2$(EX2_FLAGS)$(SIZE) \
		--data_root $(DATA_ROOT) --out_dir $(RUNS)/ex2 --resume
	mkdir -p $(IMG_SHOW)
	cp $(addprefix $(RUNS)/ex2/plots/,Conv_train_loss.png Conv_val_accuracy.png) $(IMG_SHOW)/
	$(call copy_gradient_figures,$(RUNS)/ex2/plots,$(EX2_GRADIENT_FIGURES))
	$(PY) report.py --ex2 $(RUNS)/ex2

# Time to accuracy: residual depth 20 to He et al.'s 91.25% in about a million training images (--preset
# resnet20_fast: Exercise 2's recipe on all 50,000 images for 21 epochs, flip test-time augmentation), seeds 0
# to 2; then the same recipe for plain depth 20 and plain and residual depth 38
# (seed 0: does the degradation survive a longer schedule?), and the figure of accuracy against minutes beside
# Exercise 2's runs (those of $(RUNS)/ex2, else the kept ones in results/ex2). Resumable like reproduce-ex2.
FAST_SEEDS ?=
FAST_CONVS ?= 6 12
FAST_EX2 = $(if $(wildcard $(RUNS)/ex2),$(RUNS)/ex2,results/ex2)
reproduce-fast: install
	OMP_WAIT_POLICY=PASSIVE $(PY) pipeline.py --preset resnet20_fast$(if $(FAST_SEEDS), --seed $(FAST_SEEDS))$(SIZE) \
		--data_root $(DATA_ROOT) --out_dir $(RUNS)/fast --resume
	OMP_WAIT_POLICY=PASSIVE $(PY) pipeline.py --preset resnet20_fast --num_conv_per_level $(FAST_CONVS) --residual_step 0 2 \
		--seed 0$(SIZE) --data_root $(DATA_ROOT) --out_dir $(RUNS)/fast --resume
	mkdir -p $(IMG_SHOW)
	$(PY) report.py --fast $(RUNS)/fast --ex2 $(FAST_EX2) --time_to_accuracy $(IMG_SHOW)/time_to_accuracy.png

# Exercise 3: class activation maps of Exercise 2's residual network with the best validation accuracy, for the
# first 8 test images and the lab's photo (img_show/cat2.jpg), and how faithful they are on FAITHFULNESS test images
# (deletion, insertion, Average Drop: docs/cam.md). $(RUNS)/ex3 is made afresh, so that no map of an earlier best model
# stays beside the new ones; the earlier folder is put back when a cam.py command fails.
reproduce-ex3: install
	best=$$($(PY) report.py --best_checkpoint $(RUNS)/ex2) && rm -rf $(RUNS)/.ex3.old && \
	{ [ ! -e $(RUNS)/ex3 ] || mv $(RUNS)/ex3 $(RUNS)/.ex3.old; } && { \
	$(PY) cam.py --checkpoint $$best --data_root $(DATA_ROOT) --faithfulness $(FAITHFULNESS) --out_dir $(RUNS)/ex3 && \
	$(PY) cam.py --checkpoint $$best --data_root $(DATA_ROOT) --num_images_to_save 8 --out_dir $(RUNS)/ex3 && \
	$(PY) cam.py --checkpoint $$best --image img_show/cat2.jpg --label cat --out_dir $(RUNS)/ex3 || { \
	rm -rf $(RUNS)/ex3; [ ! -e $(RUNS)/.ex3.old ] || mv $(RUNS)/.ex3.old $(RUNS)/ex3; exit 1; }; }
	rm -rf $(RUNS)/.ex3.old $(IMG_SHOW)/cam && mkdir -p $(IMG_SHOW) && cp -r $(RUNS)/ex3 $(IMG_SHOW)/cam

# Keep the reproduce runs' small files (config, history, step-0 gradient row; 0.7 MB) in results/ (with those of
# make reproduce-fast and of the recipe's ablation runs in $(RUNS)/fast-ablation, where they exist) and rewrite the
# tables of README.md, docs/analysis.md and docs/performance.md from them and from Exercise 3's faithfulness.json,
# and the time-to-accuracy figure: tests/test_results.py checks that those tables are what results/ makes.
readme: install
	$(PY) report.py --ex1 $(RUNS)/ex1 --ex2 $(RUNS)/ex2$(if $(wildcard $(RUNS)/fast), --fast $(RUNS)/fast)$(if \
		$(wildcard $(RUNS)/fast-ablation), --ablation $(RUNS)/fast-ablation) --keep results
	$(PY) report.py --ex1 results/ex1 --ex2 results/ex2 --fast results/fast$(if $(wildcard results/fast-ablation), \
		--ablation results/fast-ablation) \
		--faithfulness $(IMG_SHOW)/cam/faithfulness.json --time_to_accuracy $(IMG_SHOW)/time_to_accuracy.png \
		--readme README.md docs/analysis.md docs/performance.md

bench: install
	$(PY) bench.py --data_root $(DATA_ROOT)

# The CUDA paths on a GPU machine where torch and the requirements (wandb aside) are installed and nothing can be
# downloaded: tests/test_cuda.py, a real MNIST sweep on CUDA and bench.py's MNIST rows there, in at most 8 minutes on
# one GPU; MNIST's four .gz files are read from MNIST_GZ. Writes gpu_check/report.json.
MNIST_GZ ?= mnist
# the venv's Python where make install made one, else the machine's (a GPU machine with torch preinstalled)
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PYTHON) gpu_check.py --mnist_gz $(MNIST_GZ) --out_dir gpu_check

clean:
	rm -rf $(VENV) runs/demo
