# make demo: train a tiny model on the built-in digits, export it, sample through the runtime, bench.
# make test: lint, format check, and the test suite (no GPU needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo
# classifier-free guidance scale of the demo's samples (measured in benchmarks/quality_vs_guidance.py)
GUIDANCE := 1.25

.PHONY: demo test lint format clean

# The Triton server of the serve extra, without its dependencies: nvidia-pytriton pins numpy<2, which only
# PyTriton's own Python API needs (the tritonserver binary does not); with them pip would downgrade numpy.
PYTRITON := nvidia-pytriton==0.7.0

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps '$(PYTRITON)'
	# TensorRT 10's type stubs for tests/runtime/test_tensorrt_names.py: off sys.path and without their
	# `tensorrt` dependency (their tensorrt/ folder would make `import tensorrt` succeed as an empty package)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --upgrade --target $(VENV)/tensorrt-stubs \
		tensorrt-stubs==10.13.0.35.1
	touch $(STAMP)

# The main job, end to end: train (PyTorch) -> export (ONNX + parity table) -> sample (torch-free runtime) -> bench.
demo: $(STAMP)
	$(BIN)/dtk train --preset tiny --dataset digits --image-size 16 --steps 1500 --batch-size 64 \
		--class-conditional --sample-every 500 --out $(DEMO)/run --overwrite
	$(BIN)/dtk export $(DEMO)/run/model.pt -o $(DEMO)/bundle --batch 1:8:64
	$(BIN)/dtk inspect $(DEMO)/bundle
	$(BIN)/dtk sample $(DEMO)/bundle --class all --guidance-scale $(GUIDANCE) --num 80 --steps 10 --sampler dpmpp-2m-sde \
		--seed 0 --out $(DEMO)/samples.png
	$(BIN)/dtk bench $(DEMO)/bundle --checkpoint $(DEMO)/run/model.pt --compare torch,onnxruntime,tensorrt \
		--batch 1 --duration 2 -o $(DEMO)/bench.json
	@echo "demo: training grids in $(DEMO)/run/, runtime samples in $(DEMO)/samples.png, bench in $(DEMO)/bench.json"

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
