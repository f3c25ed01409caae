#!/usr/bin/env bash
# System packages the tests use beyond pip: headless Chromium for the report's browser test.
# Needs root (or sudo) and apt; without them the browser test is skipped with a message.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else echo "setup_system: not root and no sudo: chromium not installed" >&2; exit 0; fi
fi
if ! command -v apt-get >/dev/null 2>&1; then echo "setup_system: no apt-get: chromium not installed" >&2; exit 0; fi
$SUDO apt-get update -qq || { echo "setup_system: apt-get update failed: chromium not installed" >&2; exit 0; }
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || echo "setup_system: chromium install failed" >&2
