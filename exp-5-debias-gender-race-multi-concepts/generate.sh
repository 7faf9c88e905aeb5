#!/usr/bin/env bash
# generate for exp-5-debias-gender-race-multi-concepts. Usage: ./generate.sh [VARIANT] [extra args...]; VARIANT defaults to text-encoder (see configs/; 'toy' runs on the toy world).
exec "$(dirname "$0")/../scripts/experiment.sh" generate "$(dirname "$0")" "${1:-text-encoder}" "${@:2}"
