#!/usr/bin/env bash
# The end-to-end demo (`make demo`): synthesise a cohort, shard it at 8 and 16 um, train MagNet and the
# baselines (ST-Net-style single scale, mean profile) with DeepSpeed on the CPU (2 processes), register
# them in MLflow, then, in fresh processes, pull MagNet from the registry to predict the held-out slide
# (AnnData + gene maps; SpatialData store + a spatialdata-plot overlay) and score every model on it
# (evaluation table with the oracle ceiling).
# Every stage is seeded (seed 0 in its config); the resolved configs, seeds included, are saved next
# to each output and collected in $DEMO/seeds.json.
#   DEMO=demo PY=.venv/bin/python bash scripts/demo.sh
set -euo pipefail

DEMO=${DEMO:-demo}
PY=${PY:-.venv/bin/python}
BIN_UM=${BIN_UM:-16}  # the models are trained at this bin size (both are sharded)
export MLFLOW_TRACKING_URI="sqlite:///$DEMO/mlruns.db"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}  # DeepSpeed's compiled ops, kept
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONHASHSEED=0 TQDM_DISABLE=1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

if [ -e "$DEMO" ] && [ ! -e "$DEMO/.magnet-demo" ]; then
  echo "demo: $DEMO exists and was not written by this demo; set DEMO=another/folder" >&2
  exit 2
fi
rm -rf "$DEMO"  # a previous demo's output only (marked above): every run starts from nothing
mkdir -p "$DEMO" && touch "$DEMO/.magnet-demo"
start=$(date +%s)
stage() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

# DeepSpeed compiles its CPU communication op on first use (about a minute, once per clone, kept under
# $TORCH_EXTENSIONS_DIR): compile it on the core that the single-process synthesis leaves idle, not in the first run
$PY -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > "$DEMO/deepspeed_op_build.log" 2>&1 &
op_build=$!

stage "synthesise 5 slides (configs/synth/context.yaml: the context benchmark)"
$PY -m magnet synth --config configs/synth/context.yaml --out "$DEMO/slides"

stage "shard at 8 and 16 um (configs/shard/demo.yaml: 3 train / 1 val / 1 test slides)"
$PY -m magnet shard --samplesheet "$DEMO/slides/samplesheet.csv" --bin-um 8 16 --out "$DEMO/shards" \
  --config configs/shard/demo.yaml ray.progress=false

wait $op_build || { cat "$DEMO/deepspeed_op_build.log" >&2; echo "demo: DeepSpeed's CPU op did not build" >&2; exit 1; }

train() {  # name, registered model, then overrides
  local name=$1 registered=$2; shift 2
  stage "train $name at $BIN_UM um: DeepSpeed, 2 CPU processes -> models:/$registered@champion"
  $PY -m magnet train --config configs/train/demo.yaml --nproc 2 "data.shards=$DEMO/shards" "data.bin_um=$BIN_UM" \
    "train.out_dir=$DEMO/runs" "train.run_name=$name-${BIN_UM}um" "mlflow.tracking_uri=$MLFLOW_TRACKING_URI" \
    "mlflow.register_as=$registered" mlflow.alias=champion train.progress=false "$@"
}
train magnet magnet-demo
train stnet magnet-demo-stnet model.name=stnet
# the mean profile: one vector per level, a large lr takes it to the training mean in a few dozen steps
train mean magnet-demo-mean model.name=mean train.steps=40 optim.lr=0.2 schedule.warmup_steps=0 train.eval_every=0 \
  train.log_every=10

# genes drawn: the first selected marker, short-range, long-range and housekeeping gene (the selection is the shards')
GENES=$($PY -c "import json, sys; g = json.load(open(sys.argv[1]))['genes']; print(','.join(next(x for x in g if x.startswith(p)) for p in ('TUM', 'SHR', 'LNG', 'HK')))" \
  "$DEMO/shards/${BIN_UM}um/manifest.json")
TEST=$($PY -c "import json, sys; s = json.load(open(sys.argv[1]))['splits']; print(*[k for k, v in s.items() if v == 'test'])" \
  "$DEMO/shards/${BIN_UM}um/manifest.json")
stage "predict the held-out slide $TEST from the registry (models:/magnet-demo@champion, a fresh process)"
$PY -m magnet predict --model models:/magnet-demo@champion --spaceranger "$DEMO/slides/$TEST/outs" \
  --image "$DEMO/slides/$TEST/${TEST}_fullres.tif" --bin-um $BIN_UM --out "$DEMO/predictions/${TEST}_${BIN_UM}um.h5ad" \
  --genes $GENES --maps "$DEMO/predictions/maps" progress=false

PRED_SD="$DEMO/predictions/${TEST}_${BIN_UM}um_spatialdata.zarr"  # its own stem: {stem}.config.yaml beside each
stage "the same prediction as a SpatialData store; measured vs predicted ${GENES%%,*} drawn over the H&E by spatialdata-plot"
$PY -m magnet predict --model models:/magnet-demo@champion --spaceranger "$DEMO/slides/$TEST/outs" \
  --image "$DEMO/slides/$TEST/${TEST}_fullres.tif" --bin-um $BIN_UM --format spatialdata --out "$PRED_SD" progress=false
$PY scripts/spatialdata_overlay.py "$PRED_SD" "${GENES%%,*}" "$DEMO/predictions/${TEST}_${BIN_UM}um_${GENES%%,*}_spatialdata.png"

stage "evaluate MagNet, ST-Net and the mean profile on the test split, with the oracle ceiling"
$PY -m magnet evaluate --model magnet=models:/magnet-demo@champion --model stnet=models:/magnet-demo-stnet@champion \
  --model mean=models:/magnet-demo-mean@champion --samplesheet "$DEMO/slides/samplesheet.csv" --split test \
  --bin-um $BIN_UM --out "$DEMO/evaluation" run_name=demo-evaluation
sed -n '/^## Per gene group/,$p' "$DEMO/evaluation/evaluation.md"  # the per-group table and the paired comparisons

$PY - "$DEMO" <<'PY'
import json, sys, yaml
from pathlib import Path
demo = Path(sys.argv[1])
load = lambda p: yaml.safe_load(p.read_text())
seeds = {"synth": load(demo / "slides/config.yaml")["config"]["seed"],
         "shard": json.loads((demo / "shards/16um/manifest.json").read_text())["seed"],
         "train": {p.parent.name: load(p)["config"]["train"]["seed"] for p in sorted(demo.glob("runs/*/config.yaml"))},
         "model_init": {p.parent.name: load(p)["config"]["model"]["seed"] for p in sorted(demo.glob("runs/*/config.yaml"))},
         "evaluate_oracle": load(demo / "evaluation/evaluate.config.yaml")["config"]["seed"]}
(demo / "seeds.json").write_text(json.dumps(seeds, indent=1) + "\n")
PY

stage "done in $(( $(date +%s) - start )) s"
cat <<MSG
  slides (Space Ranger layout)  $DEMO/slides/          seeds: $DEMO/seeds.json
  shards (8 and 16 um)          $DEMO/shards/
  training runs, checkpoints    $DEMO/runs/
  prediction (AnnData)          $DEMO/predictions/${TEST}_${BIN_UM}um.h5ad
  gene maps (PNG)               $DEMO/predictions/maps/
  prediction (SpatialData)      $PRED_SD   (docs/spatialdata.md)
  overlay (spatialdata-plot)    $DEMO/predictions/${TEST}_${BIN_UM}um_${GENES%%,*}_spatialdata.png
  evaluation table              $DEMO/evaluation/evaluation.md (.csv, per slide: evaluation_slides.csv)
  registered models             models:/magnet-demo@champion, models:/magnet-demo-stnet@champion, models:/magnet-demo-mean@champion
  MLflow UI                     mlflow ui --backend-store-uri sqlite:///$DEMO/mlruns.db   (then open http://127.0.0.1:5000)
MSG
