#!/usr/bin/env bash
# Shrinks .tvmdev/ (made by ../shared/device/make-tvm-bundle.sh, 62.4 MiB) by about 2 MiB so that it still fits the
# device tool's 64 MiB carry beside this repository: the relax frontends (onnx, torch, tflite, stablehlo: the tuning
# worker gets TIR tasks), the cutlass and hexagon contrib packages, and tvm_ffi's sources and 3rdparty are removed;
# tvm_ffi goes into the same tar, so install.sh only untars. A bundle with these removals, made by hand, ran
# benchmarks/gpu_tune.sh on the H200 (2026-11-30); this script repeats them and has not itself been run there.
# Usage (from the project root, after make-tvm-bundle.sh):   bash benchmarks/trim_tvmdev.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
wheel=$(ls .tvmdev/apache_tvm_ffi-*.whl)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xJf .tvmdev/tvm.tar.xz -C "$tmp"
(cd "$tmp" && unzip -q "$OLDPWD/$wheel")
rm -rf "$tmp"/tvm/relax/frontend/{onnx,torch,tflite,stablehlo} "$tmp"/tvm/contrib/{cutlass,hexagon} \
       "$tmp"/tvm_ffi/3rdparty "$tmp"/tvm_ffi/src "$tmp"/apache_tvm-*.dist-info/RECORD
find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
echo "compressing (a minute or two)..."
(cd "$tmp" && tar cf - .) | xz -T0 -9e > .tvmdev/tvm.tar.xz
rm "$wheel"
cat > .tvmdev/install.sh <<'EOS'
# source me on the device machine, from the repository root (trimmed bundle: TVM and tvm_ffi unpacked in one tar)
mkdir -p /tmp/site && tar -xJf .tvmdev/tvm.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
EOS
du -sb .tvmdev | awk '{printf "bundle: %.1f MiB\n", $1/1048576}'
