#!/usr/bin/env bash
# The GPU check on a machine without network: install the carried wheels (benchmarks/wheels/, made by
# benchmarks/fetch_gpu_wheels.sh) that this python lacks, then run benchmarks/gpu_check.py with the
# arguments given. From the repository root:
#
#   bash benchmarks/gpu_check.sh                  # SFT, DPO, GRPO: lit-align vs TRL, bf16 on CUDA
#   bash benchmarks/gpu_check.sh --dry-run        # the same on CPU with a tiny model
#
# Installed: trl, datasets and jsonargparse when missing or not the carried version; then each of their
# requirements (dill, multiprocess, pyarrow, xxhash, fsspec...) that is missing or does not satisfy the
# requirement, if its wheel is carried. Into GPU_CHECK_SITE (default /tmp/gpu_check/site-packages), put first
# on PYTHONPATH: the machine's own packages are left as they are. PYTHON picks the interpreter (default python3).
# The folder's path must contain "site-packages": dill (datasets' fingerprints) pickles modules found elsewhere
# by value, and pyarrow's fail to pickle that way (PicklingError: Can't pickle <class 'MonthDayNano'>).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-benchmarks/wheels}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check/site-packages}
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  mapfile -t NEED < <("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as md
import pathlib
import re
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

TOP = ("trl", "datasets", "jsonargparse")  # what the check imports; the carried version is the tested one
wheels = {}
for path in pathlib.Path(sys.argv[1]).glob("*.whl"):
    name, version = path.name.split("-")[:2]
    wheels[canonicalize_name(name)] = (path, Version(version))


def installed(name):
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None


def requirements(path):
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                yield req


chosen = {}
queue = [(n, None) for n in TOP]
while queue:
    name, req = queue.pop(0)
    name = canonicalize_name(name)
    if name in chosen:
        if req is not None and not req.specifier.contains(wheels[name][1], prereleases=True):
            print(f"warning: the carried {name} {wheels[name][1]} does not satisfy {req}", file=sys.stderr)
        continue
    have = installed(name)
    if req is None:  # a package of the check: the carried version
        need = have is None or (name in wheels and have != wheels[name][1])
    else:  # a requirement of a wheel being installed
        need = have is None or not req.specifier.contains(have, prereleases=True)
    if not need:
        continue
    if name not in wheels:
        print(f"warning: {req or name} is needed, this python has {name} {have or 'none'}, and no wheel "
              "of it is carried", file=sys.stderr)
        continue
    chosen[name] = wheels[name][0]
    print(f"installing {wheels[name][0].name} (this python has {name} {have or 'none'}"
          f"{'; needed: ' + str(req) if req else ''})", file=sys.stderr)
    queue += [(r.name, r) for r in requirements(wheels[name][0])]
for path in chosen.values():
    print(path)
EOF
  )
  if [ ${#NEED[@]} -gt 0 ]; then
    if "$PY" -m pip --version > /dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${NEED[@]}"
    else  # no pip: a wheel is a zip of what goes into site-packages
      "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$SITE" "${NEED[@]}"
    fi
  fi
else
  echo "no wheels in $WHEELS (bash benchmarks/fetch_gpu_wheels.sh makes them); using this python as it is" >&2
fi

"$PY" -c "import datasets, lit_align; import importlib.util as u
print('gpu_check.sh: datasets', datasets.__version__, '| trl', __import__('trl').__version__ if u.find_spec('trl') else 'missing (TRL side skipped)')"
exec "$PY" benchmarks/gpu_check.py "$@"
