# Two commands do everything on a fresh machine:  make demo   and   make test
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PHOTOS := data/photos

.PHONY: install test test-fast demo photos bench clean default-model

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
	$(PY) tools/fetch_photos.py $(PHOTOS)

photos: $(PHOTOS)/manifest.json

test: install photos
	NETVLAD_PHOTOS=$(PHOTOS) $(PY) -m pytest

test-fast: install photos
	NETVLAD_PHOTOS=$(PHOTOS) $(PY) -m pytest -m "not slow"

demo: install photos
	$(VENV)/bin/netvlad demo

bench: install
	$(PY) benchmarks/netvlad_layer.py --case small
	$(PY) benchmarks/soft_remedian.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# How netvlad/weights/default.pt was made (2-core CPU, no GPU; about 50 min in all):
# 1. place sets from the approved photos with 20 % of the source photos held out (val/: 5 photos never
#    trained on), k-means init on every 6th training database view (12 min), 5 epochs of triplet training
#    of the last backbone block + NetVLAD (6 min);
# 2. 8 epochs training the last two backbone blocks at a lower rate (30 min). Each stage keeps the epoch
#    with the best Recall@1 on val/ (best.pt).
default-model: install photos
	ls $(PHOTOS)/*.jpg | grep -v motorcycle_right > runs-photos.txt
	$(VENV)/bin/netvlad make-placeset $$(cat runs-photos.txt) --out data/placesets/ship --holdout 0.2 --test-fraction 0 --seed 0 --overwrite
	find data/placesets/ship/train -path '*database*' -name '*.jpg' | sort | awk 'NR%6==0' > runs-init.txt
	$(VENV)/bin/netvlad init $$(cat runs-init.txt) --out runs/ship-init.pt --backbone resnet18-layer3 --clusters 32 \
		--input-mode grey --max-side 320 --no-pretrained --per-image 100 --seed 0
	$(VENV)/bin/netvlad train data/placesets/ship --model runs/ship-init.pt --out runs/ship --loss triplet --epochs 5 --amp --seed 0
	$(VENV)/bin/netvlad train data/placesets/ship --model runs/ship/best.pt --out runs/ship-ft --loss triplet --epochs 8 \
		--lr 1e-4 --train-blocks 2 --amp --seed 1
	cp runs/ship-ft/best.pt netvlad/weights/default.pt
	rm -f runs-photos.txt runs-init.txt

# The prepared GPU check (issue 13): CUDA tests, extraction, layer, faiss-gpu, AMP, a 3-minute training run.
gpu-check: install photos
	benchmarks/gpu_check.sh
