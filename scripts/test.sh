#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian bookworm machine (as root),
# then run the whole suite with trial.  The last line is "N passed, M failed[, K skipped]";
# the exit status is non-zero when anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

apt_packages=(mariadb-server mariadb-client mariadb-backup btrfs-progs lvm2 xfsprogs
              netcat-openbsd iproute2 procps psmisc util-linux e2fsprogs python3-venv
              dpkg-dev debhelper dh-virtualenv help2man python3-dev build-essential
              lintian git curl)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

venv=${ORCHAGENT_VENV:-$repo/.venv}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip >/dev/null
"$venv/bin/pip" install -q -e ".[test]"

log=$(mktemp /tmp/orchagent-trial.XXXXXX)
set +e
PATH="$venv/bin:$PATH" "$venv/bin/python" -m twisted.trial --random=0 "${@:-tests}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
summary=$(grep -E '^(PASSED|FAILED) \(' "$log" | tail -n 1)
rm -f "$log"
count() { echo "$summary" | grep -oE "$1=[0-9]+" | cut -d= -f2 | head -n1 || true; }
successes=$(count successes); failures=$(count failures); errors=$(count errors)
skips=$(count skips); unexpected=$(count unexpectedSuccesses)
passed=${successes:-0}
failed=$(( ${failures:-0} + ${errors:-0} + ${unexpected:-0} ))
if [ -z "$summary" ]; then
  failed=$(( failed + 1 ))
  echo "trial printed no summary"
fi
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo "${passed} passed, ${failed} failed, ${skips:-0} skipped"
[ "$failed" -eq 0 ]
