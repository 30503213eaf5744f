# One-command set-up, demo and tests. Both `make demo` and `make test` create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medvision-installed
DEMO_OUT ?= demo_out

.PHONY: setup demo test test-all bench sample-data clean model-chest model-hippocampus model-adrenal model-bccd

setup: $(STAMP)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
# Everything else at the exact versions in constraints.txt; the package with all its extras.
$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[all,test,dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/medvision info sample_data/real/hippocampus_003.nii.gz sample_data/ct_phantom
	$(BIN)/medvision analyze sample_data/real/chest_pneumonia.jpeg --pipeline chest-xray-pneumonia \
		-o $(DEMO_OUT)/chest --force
	$(BIN)/medvision analyze sample_data/real/hippocampus_003.nii.gz sample_data/mr_phantom.nii.gz \
		--pipeline hippocampus-seg -o $(DEMO_OUT)/hippocampus --force
	$(BIN)/medvision analyze sample_data/real/bccd_BloodImage_00003.jpg --pipeline bccd-cells \
		-o $(DEMO_OUT)/bccd --force
	$(BIN)/medvision analyze sample_data/real/adrenal_val_035.nii.gz --pipeline adrenal-3d \
		-o $(DEMO_OUT)/adrenal --force
	@echo "open $(DEMO_OUT)/{chest,hippocampus,bccd,adrenal}/summary.html: a finding with its \
	saliency, a mask with its volumes, boxes with their counts, and a phantom flagged out of \
	distribution"

# Default suite: everything but `slow`. Exit code 5 (every test deselected) is not a failure.
test: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests selected"; exit 0; fi; exit $$rc

test-all: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/bench_io.py

# Reproduce a shipped model from its pipeline file (tools/reproduce.sh): train, resuming an
# interrupted run in $(RUNS)/<name> (the fold runs of a cross-validation pipeline, then the
# ensemble), publish into pipelines/<name>/, evaluate on the validation split.
# DEVICES=cuda:0,cuda:1 trains the folds or members in parallel, one per device.
DATA ?= ../shared/data
RUNS ?= runs
DEVICES ?=
define reproduce
	BIN=$(BIN) DEVICES=$(DEVICES) bash tools/reproduce.sh $(1) $(2) $(RUNS)
endef

model-chest: setup
	$(call reproduce,chest-xray-pneumonia,$(DATA)/chest_xray/train)

model-hippocampus: setup
	$(call reproduce,hippocampus-seg,$(DATA)/hippocampus)

model-adrenal: setup
	$(call reproduce,adrenal-3d,$(DATA)/adrenalmnist3d/adrenalmnist3d_64.npz)

model-bccd: setup
	$(call reproduce,bccd-cells,$(DATA)/bccd/trainval)

sample-data: setup
	$(BIN)/python sample_data/make_sample_data.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
