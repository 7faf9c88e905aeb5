#!/usr/bin/env bash
# evaluate for exp-2-debias-gender-token. Usage: ./evaluate.sh [VARIANT] [extra args...]; VARIANT defaults to token (see configs/; 'toy' runs on the toy world).
exec "$(dirname "$0")/../scripts/experiment.sh" evaluate "$(dirname "$0")" "${1:-token}" "${@:2}"
