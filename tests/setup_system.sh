#!/usr/bin/env bash
# System packages the tests use beyond pip: headless Chromium (and its selenium driver) for the
# browser tests of the report and of `discover serve`, and
# English prose (the Python documentation's sources and `fortunes`) for `--corpus default+docs`
# and the real-model suite's under-predicted-token test.
# Needs root (or sudo) and apt; without them those tests are skipped with a message.
set -euo pipefail
PYDOC="python$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-doc"
want=()
command -v chromium >/dev/null 2>&1 || want+=(chromium)
command -v chromedriver >/dev/null 2>&1 || want+=(chromium-driver)
[ -d /usr/share/games/fortunes ] || want+=(fortunes)
dpkg -s "$PYDOC" >/dev/null 2>&1 || want+=("$PYDOC")
if [ ${#want[@]} -eq 0 ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else echo "setup_system: not root and no sudo: ${want[*]} not installed" >&2; exit 0; fi
fi
if ! command -v apt-get >/dev/null 2>&1; then echo "setup_system: no apt-get: ${want[*]} not installed" >&2; exit 0; fi
$SUDO apt-get update -qq || { echo "setup_system: apt-get update failed: ${want[*]} not installed" >&2; exit 0; }
for pkg in "${want[@]}"; do  # one at a time: a package this release lacks does not stop the others
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null || echo "setup_system: $pkg install failed" >&2
done
