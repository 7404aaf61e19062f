#!/usr/bin/env bash
# Build .whl/ray_slim.tar.xz: Ray for CPython 3.12 on x86-64, without the parts a run here never
# loads (Java jars, RLlib, Serve, LLM, the dashboard's web client), plus the packages Ray needs
# that a GPU machine's image may lack (jsonschema and its dependencies). About 25 MB: small enough
# to travel with the working tree to a machine that cannot reach a package index.
#
#   bash experiments/gpu/make_ray_bundle.sh            # once, where pip can download
#   # on the GPU machine, from the repository root:
#   mkdir -p /tmp/site && tar xJf .whl/ray_slim.tar.xz -C /tmp/site
#   export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled
#   python3 -m pytest tests/gpu -m gpu -q
#   python3 experiments/gpu/run.py --output experiments/gpu/results.json
set -euo pipefail
RAY_VERSION="${RAY_VERSION:-2.60.0}"
out_dir="$(git rev-parse --show-toplevel)/.whl"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out_dir" "$work/site"
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$work" "$@"
}
download "ray==${RAY_VERSION}"
download jsonschema jsonschema-specifications referencing rpds-py
for w in "$work"/*.whl; do (cd "$work/site" && unzip -q -o "$w"); done
rm -rf "$work/site/ray/jars" "$work/site/ray/rllib" "$work/site/ray/llm" "$work/site/ray/serve" \
  "$work/site/ray/dashboard/client"
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$work/site" -cf - . | xz -T2 -9 > "$out_dir/ray_slim.tar.xz"
ls -la "$out_dir/ray_slim.tar.xz"
