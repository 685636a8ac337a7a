#!/bin/bash
# The CPU-scale look (README.md): the sherry sweep's points in priority order
# (absmean, sherry, sherry without Arenas, tequila), each exactly as the
# sweep's own worker (`run_point`) would, then the sweep itself, which finds
# them done and tabulates. Run from the repository root:
#   bash experiments/results/sherry/run_points.sh runs/sherry [STEPS]
# (STEPS: 100 by default; the first look ran 50). Resumable: rerun it after
# an interruption.
export PYTHONPATH=$PWD
OUT=${1:-runs/sherry}
STEPS=${2:-100}
FIXED="\"train.steps\": $STEPS, \"train.batch_size\": 4, \"data.seq_len\": 128, \"diagnostics.trap_steps\": 10, \"train.log_every\": 5, \"train.eval_every\": $STEPS, \"train.checkpoint_every\": 25, \"train.progress\": false, \"train.tensorboard\": false"
for p in 'method=absmean|"model.quant.method": "absmean"' \
         'method=sherry|"model.quant.method": "sherry"' \
         'arenas_max_eps=0.0,method=sherry|"model.quant.method": "sherry", "model.quant.arenas_max_eps": 0.0' \
         'method=tequila|"model.quant.method": "tequila"'; do
  name=${p%%|*}; ov=${p#*|}
  if [ -e "$OUT/$name/summary.json" ]; then continue; fi
  echo "=== $name $(date)"
  python -c "
import json, pathlib, sys
from experiments import sweep
sweep.run_point('configs/smollm2_135m.py', json.loads(sys.argv[1]),
                pathlib.Path('$OUT') / sys.argv[2], max_eval_windows=192)
" "{$FIXED, $ov}" "$name" || exit 1
done
echo "=== sweep $(date)"
python -m experiments.sweep --config configs/smollm2_135m.py --sweep sherry \
  --set train.steps=$STEPS --set train.batch_size=4 --set data.seq_len=128 \
  --set diagnostics.trap_steps=10 --set train.log_every=5 \
  --set train.eval_every=$STEPS --set train.checkpoint_every=25 \
  --set train.progress=false --set train.tensorboard=false \
  --eval_windows 192 --reference method=absmean --out $OUT
echo "=== done $(date)"
