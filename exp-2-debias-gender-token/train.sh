#!/usr/bin/env bash
# train for exp-2-debias-gender-token. Usage: ./train.sh [VARIANT] [extra args...]; VARIANT defaults to token (see configs/; 'toy' runs on the toy world).
exec "$(dirname "$0")/../scripts/experiment.sh" train "$(dirname "$0")" "${1:-token}" "${@:2}"
