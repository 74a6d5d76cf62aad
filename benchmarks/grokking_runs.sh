#!/usr/bin/env bash
# The runs of the grokking seed study (docs/grokking.md): SEEDS of one config, one thread each, one
# after another, each into runs/<config name>/seed_<n>. A finished run (ood_metrics.json written) is
# kept; an unfinished one is started again from scratch.
#   bash benchmarks/grokking_runs.sh configs/grokking_modadd.yaml 0 1 2 3 4 5 6 7
#   python benchmarks/grokking.py runs/grokking_modadd/seed_* --out docs/figures/grokking_seeds.png
set -euo pipefail
config=$1
shift
name=$(basename "$config" .yaml)
mkdir -p "runs/$name"
for seed in "$@"; do
  run="runs/$name/seed_$seed"
  if [[ -f "$run/ood_metrics.json" ]]; then
    echo "$run: done"
    continue
  fi
  rm -rf "$run"
  start=$(date +%s)
  OMP_NUM_THREADS=1 python train.py fit --config "$config" --seed_everything "$seed" \
    --trainer.logger.init_args.version "seed_$seed" --trainer.enable_progress_bar false \
    > "runs/$name.seed_$seed.log" 2>&1
  echo "$run: $(( $(date +%s) - start )) s"
done
