#!/usr/bin/env bash
# The body of every experiment folder's train.sh / export.sh / generate.sh / evaluate.sh (one implementation).
#   scripts/experiment.sh ACTION EXP_DIR VARIANT [extra args...]
# ACTION: train | export | generate | evaluate. VARIANT: text-encoder | unet | text-encoder-and-unet | token | toy.
# NUM_GPUS=N (default 1) trains with N processes through `accelerate launch`; train.images_per_prompt is GLOBAL.
# OUTPUT_DIR=DIR replaces the config's paths.output_dir for every action (train, export, generate, evaluate alike).
set -euo pipefail
action=$1; exp_dir=$(cd "$2" && pwd); variant=$3; shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=${PYTHON:-$root/.venv/bin/python}
[ -x "$PY" ] || PY=python
if [ "$variant" = toy ]; then cfg=$exp_dir/configs/toy.yaml; else cfg=$exp_dir/configs/debias-$variant.yaml; fi
if [ ! -f "$cfg" ]; then
  echo "error: $cfg does not exist; variants here: $(ls "$exp_dir/configs" | grep -E '^(debias-|toy)' | sed -e 's/^debias-//' -e 's/\.yaml$//' | tr '\n' ' ')" >&2
  exit 2
fi
# the few config values the shell needs, read through the project's own config loader
# (a config error is one sentence and exit code 2, as from every tool)
vals=$("$PY" -c "
import sys
from common.config import ConfigError, data_root, load_config
try:
    c = load_config(sys.argv[1])
except ConfigError as e:
    sys.exit(print('error:', e, file=sys.stderr) or 2)
s = c.sampling
print(c.paths.output_dir, c.model.name, ','.join(c.prompts.test), s.test_images_per_prompt, c.judges.eval_classifier,
      c.judges.detector, ','.join(c.judges.features) or '-', s.test_steps, s.guidance, s.image_size,
      c.judges.agreement or '-', data_root(c.paths.data_dir))
" "$cfg") || exit $?
read -r out model prompts n_img classifier detector features steps guidance size judge2 data <<< "$vals"
set_out=()
if [ -n "${OUTPUT_DIR:-}" ]; then out=$OUTPUT_DIR; set_out=(--set "paths.output_dir=$out"); fi
# every tool resolves data paths against the config's data folder
export FAIR_DIFFUSION_DATA=$data
gen=(--steps "$steps" --guidance "$guidance" --image-size "$size")
encoders=(--image-encoders); [ "$features" = - ] || encoders+=(${features//,/ })
case $action in
  train)
    n=${NUM_GPUS:-1}
    if [ "$n" -gt 1 ]; then
      exec "$PY" -m accelerate.commands.launch --config_file "$exp_dir/configs/accelerate-multi-gpu.yaml" \
        --num_processes "$n" -m common.train --config "$cfg" "${set_out[@]}" "$@"
    fi
    exec "$PY" -m common.train --config "$cfg" "${set_out[@]}" "$@" ;;
  export)
    exec "$PY" -m common.export --run "$out" --out "$out/export" "$@" ;;
  generate)
    args=()
    for p in ${prompts//,/ }; do args+=(--prompts "$p"); done
    "$PY" -m common.generate --model "$model" "${args[@]}" --images-per-prompt "$n_img" "${gen[@]}" \
      --out "$out/images/original" "$@"
    exec "$PY" -m common.generate --model "$model" --lora "$out/export" "${args[@]}" --images-per-prompt "$n_img" \
      "${gen[@]}" --out "$out/images/debiased" "$@" ;;
  evaluate)
    second=(); [ "$judge2" = - ] || second=(--judge2 "$judge2")  # judges.agreement: a second judge, when set
    exec "$PY" -m common.evaluate --images "$out/images/debiased" --reference "$out/images/original" \
      --classifiers "$classifier" --detector "$detector" "${encoders[@]}" "${second[@]}" --judges-config "$cfg" \
      --out "$out/eval" "$@" ;;
  *) echo "error: unknown action '$action' (train | export | generate | evaluate)" >&2; exit 2 ;;
esac
