#!/usr/bin/env bash
# export for exp-5-debias-gender-race-multi-concepts. Usage: ./export.sh [VARIANT] [extra args...]; VARIANT defaults to text-encoder (see configs/; 'toy' runs on the toy world).
exec "$(dirname "$0")/../scripts/experiment.sh" export "$(dirname "$0")" "${1:-text-encoder}" "${@:2}"
