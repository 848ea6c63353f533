#!/usr/bin/env bash
# The GPU check of issue 29 item 8 in ONE device call: install, measurements/gpu_check.py, then
# `openclip-align benchmark --gpu --quick`, results under $OUT.
#
# The device machine (one H200, see /work/.library/device/) starts bare and reaches no network; its python3
# (3.12, /opt/torch/.venv) has torch, timm, transformers, sentence-transformers, pandas, scikit-learn,
# matplotlib, filelock, huggingface_hub, safetensors, regex, but not open_clip_torch, webdataset,
# braceexpand, ftfy (+ wcwidth), nor this plugin. Those travel as wheels in .whl/. The working tree that
# travels is at most 64 MiB, so the all-mpnet-base-v2 weights (420 MB) and the MiniLM package (88 MB) stay
# here: the check embeds with mpnet's architecture and tokenizer at random weights (the same time per
# caption), from .gpu_check/mpnet-skeleton; the benchmark trains on the small corpus (.gpu_check/small,
# its caption embeddings precomputed), and its on-the-fly MiniLM speed row fails for want of the encoder.
#
# 1. HERE (CPU machine, pip reaches PyPI), from the repository root, once per session:
#        bash measurements/gpu_check.sh prepare
#    builds .whl/ (the wheels above + this plugin's own wheel) and .gpu_check/ (mpnet skeleton, small
#    corpus), both ignored through .git/info/exclude, and prints their size (they must stay under ~55 MiB).
# 2. ON THE DEVICE, one call (what a later session runs; 600 s is the most one command may take):
#        run(command="bash measurements/gpu_check.sh", carry=[".whl", ".gpu_check"], timeout_s=600)
#    gpu_check.py gets at most GPU_CHECK_S seconds (default 330: the mpnet embedding first, about a minute,
#    then six runs of a few dozen steps whose first step compiles) and the benchmark the rest, minus a margin
#    to copy results; a part cut short by its timeout keeps what it wrote (gpu_check.py rewrites its results
#    after every run). Not measured before the first device call: read gpu_check.log, and if the benchmark
#    was cut, give GPU_CHECK_S/GPU_CALL_S other values in the command (e.g. "GPU_CHECK_S=300 bash ..."). Comes back (at most 8 files): $OUT/gpu-h200-check/results.{json,md},
#    $OUT/benchmark-gpu-quick/results.{json,md}, $OUT/gpu_check.log.
# 3. HERE: copy $OUT/gpu-h200-check to benchmark/gpu-h200-check/ and commit it.
#
# The dry run of the same script's Python part needs no GPU: python measurements/gpu_check.py --dry-run --out DIR
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
WHEELS=(open_clip_torch==3.3.0 webdataset==0.2.86 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.2.13)

prepare() {
    set -e
    for ignored in /.whl/ /.gpu_check/; do
        grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
    done
    rm -rf .whl .gpu_check && mkdir -p .whl .gpu_check
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
    python3 -m pip wheel -q --no-deps -w .whl .                     # this plugin (carries the .pth hook)
    python3 - <<'EOF'
import shutil
from pathlib import Path
from openclip_align.data.semantic import mpnet_path
source, target = mpnet_path(), Path(".gpu_check/mpnet-skeleton")
shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "*.h5",
                                                              "*.ot", "*.msgpack", "desktop.ini", "README.md"))
print("mpnet skeleton:", sorted(p.name for p in target.rglob("*") if p.is_file()))
EOF
    python3 -m openclip_align.cli data build --out .gpu_check/small --size small
    # the corpus's csv files and records name absolute paths: the device rewrites this prefix to its own
    (cd .gpu_check/small && pwd) > .gpu_check/small-built-at
    du -sh .whl .gpu_check
    total=$(du -sm .whl .gpu_check | awk '{s += $1} END {print s}')
    if [ "$total" -gt 55 ]; then echo "carried folders hold ${total} MiB: over the 64 MiB call limit with the tree"; exit 1; fi
}

device() {
    local start=$SECONDS budget=${GPU_CALL_S:-570} check_s=${GPU_CHECK_S:-330}
    local out="${OUT:?OUT is set by the device tool}"
    exec > >(tee "$out/gpu_check.log") 2>&1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl; then
        # a read-only environment: install beside it; sitecustomize does what the plugin's .pth does there
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
        echo 'import openclip_align' > /tmp/site/sitecustomize.py
        export PYTHONPATH=/tmp/site
    fi
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    python3 -c "import open_clip, openclip_align, open_clip_train; print('open_clip', open_clip.__version__)" || exit 3
    local built_at here
    built_at="$(cat .gpu_check/small-built-at)" here="$(cd .gpu_check/small && pwd)"
    grep -rlF "$built_at" .gpu_check/small --include='*.csv' --include='*.json' | xargs -r sed -i "s#${built_at}#${here}#g"

    timeout --signal=INT "$check_s" python3 measurements/gpu_check.py --out "$out/gpu-h200-check" \
        --mpnet-skeleton .gpu_check/mpnet-skeleton
    local check_rc=$?
    echo "gpu_check.py exit $check_rc after $((SECONDS - start)) s"

    local left=$((budget - (SECONDS - start) - 20))
    if [ "$left" -gt 60 ]; then
        timeout --signal=INT "$left" python3 -m openclip_align.cli benchmark --gpu --quick --data .gpu_check/small \
            --out /tmp/benchmark-gpu-quick
        echo "benchmark --gpu --quick exit $? after $((SECONDS - start)) s"
        mkdir -p "$out/benchmark-gpu-quick"
        cp /tmp/benchmark-gpu-quick/results.json /tmp/benchmark-gpu-quick/results.md "$out/benchmark-gpu-quick/" \
            2>/dev/null || echo "benchmark wrote no results"
    else
        echo "no time left for benchmark --gpu --quick (${left} s)"
    fi
    rm -rf "$out/gpu-h200-check/.work"
    return "$check_rc"
}

case "${1:-device}" in
    prepare) prepare ;;
    device) device ;;
    *) echo "usage: bash measurements/gpu_check.sh [prepare|device]"; exit 2 ;;
esac
