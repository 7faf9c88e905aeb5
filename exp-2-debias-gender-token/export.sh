#!/usr/bin/env bash
# export for exp-2-debias-gender-token. Usage: ./export.sh [VARIANT] [extra args...]; VARIANT defaults to token (see configs/; 'toy' runs on the toy world).
exec "$(dirname "$0")/../scripts/experiment.sh" export "$(dirname "$0")" "${1:-token}" "${@:2}"
