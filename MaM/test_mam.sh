#!/usr/bin/env bash
# Upstream's test entry point, same flags: the 15 scenarios into <output-path>/prediction_<bits>, then the scores.
#   bash MaM/test_mam.sh --input-path <imagesTs> --output-path <dir> --checkpoint-path checkpoint_best.pth
set -euo pipefail
exec "${PYTHON:-python}" -m MaM.test "$@"
