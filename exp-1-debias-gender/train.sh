#!/usr/bin/env bash
# train for exp-1-debias-gender. Usage: ./train.sh [VARIANT] [extra args...]; VARIANT defaults to text-encoder (see configs/; 'toy' runs on the toy world).
exec "$(dirname "$0")/../scripts/experiment.sh" train "$(dirname "$0")" "${1:-text-encoder}" "${@:2}"
