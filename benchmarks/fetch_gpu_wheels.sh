#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh installs on the GPU machine, which has torch,
# lightning, transformers, peft, pandas and the like, but not trl, datasets, jsonargparse (nor wandb,
# which the check does not need), and no network. Run it here, where pip reaches the package registry:
#
#   bash benchmarks/fetch_gpu_wheels.sh                 # -> benchmarks/wheels/ (git-ignored), for Python 3.12
#   NO_PYARROW=1 bash benchmarks/fetch_gpu_wheels.sh    # without pyarrow (~52 MiB): when the GPU machine's
#                                                       # pyarrow is >= 24 (datasets' floor) it is not needed
#   PYVER=3.11 bash benchmarks/fetch_gpu_wheels.sh /tmp/wheels   # for another Python, into another folder
#
# Versions are this checkout's venv's (what the tests run against), pinned below as a fallback. Pure-Python
# wheels where they exist; pyarrow, xxhash and multiprocess are built per Python version (PYVER, default
# 3.12: the GPU machine's python3), for x86-64 manylinux. gpu_check.sh installs only those the machine
# lacks (or has in a version that does not satisfy trl/datasets). Everything that travels to the GPU
# machine (the working tree plus the carried paths) must stay within 64 MiB: the total is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-benchmarks/wheels}
PYVER=${PYVER:-3.12}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# The venv's version of a distribution, else the fallback.
ver() { "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print(sys.argv[2])" "$1" "$2"; }

PACKAGES=(
  "trl==$(ver trl 1.16.0)"
  "datasets==$(ver datasets 5.2.0)"
  "jsonargparse==$(ver jsonargparse 4.53.0)"
  # datasets' own needs that the GPU machine may lack or have in another version
  "dill==$(ver dill 0.4.1)"
  "multiprocess==$(ver multiprocess 0.70.19)"
  "xxhash==$(ver xxhash 4.1.0)"
  "fsspec==$(ver fsspec 2026.9.0)"
)
if [ -z "${NO_PYARROW:-}" ]; then
  PACKAGES+=("pyarrow==$(ver pyarrow 26.0.1)")
fi

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${PACKAGES[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 cat 2>/dev/null | wc -c)
"$PY" - "$DEST" "$tree" <<'EOF'
import pathlib, sys
dest, tree = pathlib.Path(sys.argv[1]), int(sys.argv[2])
wheels = sorted(dest.glob("*.whl"))
total = sum(w.stat().st_size for w in wheels)
print(f"wheels in {dest}:")
for w in wheels:
    print(f"  {w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
print(f"total {total / 2**20:.2f} MiB of wheels ({total} bytes); with the working tree ({tree / 2**20:.2f} MiB): "
      f"{(total + tree) / 2**20:.2f} MiB of the 64 MiB that may travel")
if total + tree > 64 * 2**20:
    sys.exit("over 64 MiB: try NO_PYARROW=1")
EOF
