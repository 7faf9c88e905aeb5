#!/usr/bin/env bash
# evaluate for exp-6-debias-race. Usage: ./evaluate.sh [VARIANT] [extra args...]; VARIANT defaults to text-encoder (see configs/; 'toy' runs on the toy world).
exec "$(dirname "$0")/../scripts/experiment.sh" evaluate "$(dirname "$0")" "${1:-text-encoder}" "${@:2}"
