# Two commands do everything on a fresh machine:  make demo   and   make test
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PHOTOS := data/photos

.PHONY: install test test-fast demo photos bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# Installed from the pinned lock file, then the project itself (editable) without re-resolving.
$(VENV)/.installed: $(VENV)/bin/activate requirements.lock pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# Real photographs from the approved sources (Debian wallpaper packages, scikit-learn and
# scikit-image samples); falls back to the bundled samples without network.
$(PHOTOS)/manifest.json: $(VENV)/.installed
	$(VENV)/bin/netvlad fetch-photos $(PHOTOS)

photos: $(PHOTOS)/manifest.json

test: install photos
	NETVLAD_PHOTOS=$(PHOTOS) $(PY) -m pytest

test-fast: install photos
	NETVLAD_PHOTOS=$(PHOTOS) $(PY) -m pytest -m "not slow"

demo: install photos
	@$(VENV)/bin/netvlad demo --help >/dev/null 2>&1 \
		&& $(VENV)/bin/netvlad demo \
		|| echo "make demo: the web demo is coming (service issue); meanwhile try: $(VENV)/bin/netvlad describe $(PHOTOS)/*.jpg --model default"

bench: install
	$(PY) benchmarks/netvlad_layer.py --case small
	$(PY) benchmarks/soft_remedian.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
