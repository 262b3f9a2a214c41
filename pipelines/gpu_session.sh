#!/bin/bash
# The prepared GPU session: the speed check, then rows of the paper-preset miniature, in one call of this
# workplace's device tool (pipelines/README.md, "On a GPU"). Run from the repository root on the GPU machine:
#
#     bash pipelines/gpu_session.sh            # carry: .whl, .devdata (and the miniature's artifacts folder)
#
# What it needs beside the checkout (made here, on the CPU machine, before the call):
#   .whl/      wheels the GPU image lacks: webdataset, braceexpand, diffusers, importlib_metadata, lazy-importer
#              (`pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl NAME==VERSION`)
#   .devdata/fmnist/   the four Fashion-MNIST idx files (/usr/share/datasets/fashion-mnist/*)
#   artifacts/benchmark/fmnist28-paper-miniature-h200/   the first GPU sitting's teacher and finished runs, so that
#              new rows use the same teacher (a retrained one would differ on a GPU) and finished rows are reused
# Its figures land in $OUT (the device tool brings them back): gpu_check.{json,md}, mini.log, mini.tgz.
#
# Settings (environment): CHECK_SECONDS (the speed check's budget, default 200), ROWS (the miniature's rows,
# default D2CIP's three: its 10,000-iteration stage 1 did not finish in 6 minutes beside 11 other runs on one
# H200), LANES (runs sharing the GPU, default 3; equal-images rows compare accuracy, so sharing is fair, but their
# seconds are then not one run's), END (seconds after which the miniature stops, default 540).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
started=$(date +%s)
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
export PYTHONPATH=/tmp/site:$PWD DFKD_FMNIST_DIR=$PWD/.devdata/fmnist
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } > "$out/env.txt" 2>&1
# Fail fast (seconds, not the whole call) when the image lacks something.
python3 -c "import torch, webdataset, diffusers, synth.commands.cli, distill.cli
print(torch.__version__, torch.cuda.is_available()); assert torch.cuda.is_available()" >> "$out/env.txt" 2>&1 \
    || { cat "$out/env.txt"; exit 4; }
cat "$out/env.txt"
timeout $(( ${CHECK_SECONDS:-200} + 30 )) python3 -m pipelines.gpu_check --budget "${CHECK_SECONDS:-200}" \
    --max-steps 20 --out "$out/gpu_check.json" > "$out/gpu_check.log" 2>&1
cat "$out/gpu_check.md" 2>/dev/null || tail -20 "$out/gpu_check.log"
# The miniature in its own folder (never mixed with the CPU sittings' table).
sed 's#fmnist28-paper-miniature"#fmnist28-paper-miniature-h200"#' pipelines/fmnist28_paper_miniature.toml \
    > /tmp/miniature-gpu.toml
left=$(( ${END:-540} - ($(date +%s) - started) ))
echo "miniature: ${ROWS:-d2cip;d2cip w/o L_scr;d2cip w/o L_zcr}, $left s"
timeout "$left" python3 -m pipelines.benchmark /tmp/miniature-gpu.toml --lanes "${LANES:-3}" --threads-per-lane 1 \
    --rows "${ROWS:-d2cip;d2cip w/o L_scr;d2cip w/o L_zcr}" > "$out/mini.log" 2>&1
# Not the shards, the students' weights or D2CIP's stage-1 checkpoints (resume/, ~60 MB each): only 16 MiB a file
# comes back, and a folder of checkpoints could not travel to the next sitting either (64 MiB carry).
tar czf "$out/mini.tgz" --exclude='*.tar' --exclude='student/*.pt' --exclude='resume' \
    -C artifacts/benchmark fmnist28-paper-miniature-h200
grep -E "^   |rror" "$out/mini.log" | tail -40
