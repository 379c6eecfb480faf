# Two commands do all set-up on a fresh machine:
#   make example   install into .venv, build the built-in example model, compress it
#   make test      install into .venv and run the default test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: example test test-slow install clean

$(BIN)/onnxc: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/onnxc

install: $(BIN)/onnxc

example: install
	$(BIN)/python examples/make_example.py
	$(BIN)/onnxc compress examples/digits_cnn.onnx --passes fold_bn,prune,int8 \
	    --prune-flops 0.5 --prune-criterion thinet --calib-data examples/digits_train.npz \
	    --eval-data examples/digits_test.npz --scale 0.0625 --target onnx -o out/example
	@echo "artifact: out/example (model.onnx, report.json, README.md)"

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf out/example examples/*.onnx examples/*.npz
