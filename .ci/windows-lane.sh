#!/usr/bin/env bash
# The Windows lane: the tests marked `windows` on python.org's Windows CPython 3.11 under
# Wine (built and cached per machine by .ci/wine-python.sh), against a Prefect server on the
# Linux side (.ci/windows_lane.py). Run by .ci/run after the Linux suite, in its venv.
#
# Wine and MinGW (for the ProcessPrng stand-in) are Debian packages: installed here when
# missing and we are root. Where they can't be had the lane is skipped with the reason; with
# REQUIRE_WINE=1 (.ci/run sets it) that is a failure instead.
set -euo pipefail
cd "$(dirname "$0")/.."

missing() {
  local need=()
  command -v wine >/dev/null 2>&1 || need+=(wine wine64)
  command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1 || need+=(gcc-mingw-w64-x86-64-win32)
  echo "${need[@]}"
}

need=$(missing)
# SITE_PIPELINE_WINE_INSTALL=0: never install (tests/project/test_wine_lane.py checks the skip).
if [ -n "$need" ] && [ "${SITE_PIPELINE_WINE_INSTALL:-1}" != 0 ] && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  echo "== Windows lane: installing $need"
  # shellcheck disable=SC2086
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null; } \
    || echo "== Windows lane: apt-get install $need failed"
  need=$(missing)
fi
if [ -n "$need" ]; then
  reason="Wine can't be had here (missing: $need; apt-get install wine wine64 gcc-mingw-w64-x86-64-win32 as root)"
  if [ "${REQUIRE_WINE:-}" = 1 ]; then
    echo "== Windows lane: FAILED: $reason, and REQUIRE_WINE=1" >&2
    exit 1
  fi
  echo "== Windows lane: SKIPPED: $reason"
  exit 0
fi

started=$(date +%s)
home=$(bash .ci/wine-python.sh "$(command -v python)" | tail -n 1)
echo "== Windows lane: Windows Python ready in $(( $(date +%s) - started )) s ($home)"
export WINEPREFIX="$home/prefix" WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml=;bcryptprimitives=n,b"
code=0
timeout --kill-after=10 660 python .ci/windows_lane.py "$WINEPREFIX/drive_c/python311/python.exe" || code=$?
wineserver -k 2>/dev/null || true  # this prefix's Wine services (the tests left no pipeline: checked)
echo "== Windows lane: $(( $(date +%s) - started )) s in all"
exit "$code"
