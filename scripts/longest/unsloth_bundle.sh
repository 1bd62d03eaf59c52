#!/usr/bin/env bash
# Unsloth for a GPU machine without internet, as one archive: Unsloth and the packages it needs that the GPU image
# (torch 2.11, transformers 5.17, peft, accelerate, triton, pyarrow, ...) lacks, installed for CPython 3.12 on
# x86-64 Linux into one folder, then trimmed: Unsloth Studio (its web interface, which training never imports) and
# bitsandbytes' libraries for other CUDA versions than 13.0 / 13.2 go. xformers stays out (its wheels are built for
# another torch, and Unsloth then uses PyTorch's attention). Needs a package index here; writes $BUNDLE (default
# .whl/unsloth-bundle.tgz, about 28 MB). On the GPU machine:
#   mkdir -p /tmp/usb && tar xzf .whl/unsloth-bundle.tgz -C /tmp/usb && export PYTHONPATH=$PWD/src:/tmp/usb
#   bash scripts/longest/run.sh    # now finds `unsloth` and searches its longest length too
# The pins are those of the 2026-12-02 H200 runs (Unsloth 2026.10.9) and the dependencies' newest matching releases
# of 2026-12-06; PYTHON names the interpreter whose pip downloads.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${BUNDLE:-.whl/unsloth-bundle.tgz}
pins=(
  unsloth==2026.10.9 unsloth-zoo==2026.10.9 bitsandbytes==0.50.2 trl==1.15.0 datasets==4.8.5 torchao==0.18.0
  diffusers==0.42.1 cut-cross-entropy==25.1.1 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
  hf-transfer==0.1.9 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  json5==0.17.3 nest-asyncio==1.6.0 structlog==26.1.0 msgspec==0.23.0 dill==0.4.1 multiprocess==0.70.19
  importlib-metadata==10.2.0 lazy-importer==0.1.0
)
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
${PYTHON:-python3} -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 --target "$work/site" "${pins[@]}"
rm -rf "$work/site/studio" "$work/site/bin"
find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cuda132*' ! -name '*cpu*' -delete
mkdir -p "$(dirname "$out")"
tar czf "$out" -C "$work/site" .
echo "$out: $(du -h "$out" | cut -f1), $(tar tzf "$out" | grep -c 'dist-info/METADATA$') packages"
