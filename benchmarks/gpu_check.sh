#!/usr/bin/env bash
# One prepared GPU check (issue 13), one command:  benchmarks/gpu_check.sh [--quick]
#
# Runs the CUDA-marked tests (pytest -m gpu), extraction images/s end-to-end ÷ backbone-only with
# AMP (benchmarks/extraction.py), the NetVLAD layer fwd+bwd against the loop reference
# (benchmarks/netvlad_layer.py), faiss-gpu against faiss-cpu at 1 M descriptors
# (benchmarks/faiss_gpu.py), AMP against float32 descriptor cosine (benchmarks/amp_cosine.py) and a
# TRAIN_S-second (default 180) run of the shipped model's recipe (`make default-model`, stage 1)
# with its training images/s. Under 8 minutes on one GPU. Without CUDA the CUDA parts are skipped
# with a message; --quick (or GPU_CHECK_QUICK=1) shrinks the rest to a smoke run (tests/test_gpu_check.py).
# Writes results.json and results.md to $OUT, else ./gpu-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NETVLAD=${NETVLAD:-.venv/bin/netvlad}
RESULTS=${OUT:-./gpu-results}
QUICK=${GPU_CHECK_QUICK:-0}
[[ "${1:-}" == "--quick" ]] && QUICK=1
TRAIN_S=${TRAIN_S:-180}
mkdir -p "$RESULTS"
PARTS=$(mktemp -d)
trap 'rm -rf "$PARTS"' EXIT
CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
[[ $CUDA == 1 ]] || echo "gpu_check: no CUDA device: skipping the CUDA parts (layer, faiss-gpu, AMP cosine)" >&2
skip() { echo "{\"skipped\": \"$1\"}" > "$PARTS/$2.json"; echo "gpu_check: $2 skipped: $1" >&2; }

echo "gpu_check: CUDA-marked tests" >&2
if $PY -m pytest -m gpu -q -p no:cacheprovider --junitxml "$PARTS/gpu-tests.xml" tests/test_gpu.py >&2; then status=passed; else status=failed; fi
$PY - "$PARTS/gpu-tests.xml" "$status" > "$PARTS/tests.json" <<'PY'
import json, sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot().find("testsuite")
print(json.dumps({"status": sys.argv[2], **{k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}}))
PY

echo "gpu_check: extraction end-to-end ÷ backbone-only (AMP)" >&2
if [[ $QUICK == 1 ]]; then size=(--count 8 --size 320x240 --workers 1); else size=(--count 256); fi
$PY benchmarks/extraction.py --amp "${size[@]}" > "$PARTS/extraction.json"

if [[ $CUDA == 1 ]]; then
  echo "gpu_check: NetVLAD layer fwd+bwd vs loop reference" >&2
  $PY benchmarks/netvlad_layer.py --device cuda --case big | tee "$PARTS/layer.txt" >&2
  $PY - "$PARTS/layer.txt" > "$PARTS/layer.json" <<'PY'
import json, re, sys
m = re.search(r"big: loop/ours time ([\d.]+)x, peak memory ([\d.]+)x", open(sys.argv[1]).read())
print(json.dumps({"speedup": float(m[1]) if m else None, "memory_ratio": float(m[2]) if m else None}))
PY
  echo "gpu_check: faiss GPU vs CPU at 1 M descriptors" >&2
  $PY benchmarks/faiss_gpu.py --n 1000000 > "$PARTS/faiss.json"
  echo "gpu_check: AMP vs float32 descriptors" >&2
  $PY benchmarks/amp_cosine.py --device cuda --count 64 > "$PARTS/amp.json"
else
  skip "no CUDA device" layer; skip "no CUDA device" faiss; skip "no CUDA device" amp
fi

echo "gpu_check: training run of the shipped recipe" >&2
RUN="$PARTS/train"
if [[ $QUICK == 1 ]]; then
  photos=(data/photos/sklearn-china.jpg data/photos/skimage-coffee.jpg)
  placeset=(--out-size 64x48 --queries-per-photo 10 --crop-size 256 --stride 64)
  init=(--clusters 4 --max-side 64 --per-image 40)
  train=(--epochs 1 --batch-size 3 --negatives 30 --max-negatives 2)
else
  mapfile -t photos < <(ls data/photos/*.jpg | grep -v motorcycle_right)
  placeset=(--holdout 0.2)
  init=(--clusters 32 --max-side 320 --per-image 100)
  train=(--epochs 50)
fi
$NETVLAD make-placeset "${photos[@]}" --out "$RUN/set" --seed 0 --no-progress "${placeset[@]}" >&2
find "$RUN/set" -path '*database*' -name '*.jpg' | sort | awk 'NR%6==0' > "$PARTS/init.txt"
$NETVLAD init $(cat "$PARTS/init.txt") --out "$RUN/init.pt" --backbone resnet18-layer3 --input-mode grey \
  --no-pretrained --seed 0 "${init[@]}" >&2
timeout --signal INT "$TRAIN_S" $NETVLAD train "$RUN/set" --model "$RUN/init.pt" --out "$RUN/run" --loss triplet \
  --amp --seed 0 --no-progress "${train[@]}" >&2 || echo "gpu_check: training stopped after ${TRAIN_S} s" >&2
$PY - "$RUN/run/log.csv" "$TRAIN_S" > "$PARTS/training.json" <<'PY'
import csv, json, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["images_per_s"]]
rates = [float(r["images_per_s"]) for r in rows]
print(json.dumps({"limit_s": int(sys.argv[2]), "epochs": len(rows), "images_per_s": sum(rates) / len(rates) if rates else None,
                  "recall@1": float(rows[-1]["recall@1"]) if rows else None}))
PY

$PY - "$PARTS" "$RESULTS" "$QUICK" <<'PY'
import datetime, json, pathlib, sys, torch
parts, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
results = {name: json.loads((parts / f"{name}.json").read_text() or "{}")
           for name in ("tests", "extraction", "layer", "faiss", "amp", "training")}
results["meta"] = {"date": datetime.date.today().isoformat(), "quick": sys.argv[3] == "1", "torch": torch.__version__,
                   "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
(out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
r = results
def get(part, key):
    return r[part].get("skipped", "skipped") if "skipped" in r[part] else r[part].get(key)
rows = [("CUDA-marked tests", f"{r['tests']['status']}: {r['tests']['tests']} run, {r['tests']['skipped']} skipped"),
        ("extraction end-to-end ÷ backbone (AMP)", get("extraction", "ratio")),
        ("NetVLAD layer speed-up vs loop", get("layer", "speedup")),
        ("faiss GPU ÷ CPU queries/s (1 M)", get("faiss", "speedup")),
        ("faiss GPU recall@10", get("faiss", "recall@10")),
        ("AMP vs fp32 min cosine", get("amp", "min_cosine")),
        ("training images/s", get("training", "images_per_s"))]
table = [f"GPU check {r['meta']['date']} on {r['meta']['gpu'] or 'no GPU (CUDA parts skipped)'}", "",
         "| check | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
(out / "results.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
PY
