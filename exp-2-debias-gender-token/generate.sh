#!/usr/bin/env bash
# generate for exp-2-debias-gender-token. Usage: ./generate.sh [VARIANT] [extra args...]; VARIANT defaults to token (see configs/; 'toy' runs on the toy world).
exec "$(dirname "$0")/../scripts/experiment.sh" generate "$(dirname "$0")" "${1:-token}" "${@:2}"
