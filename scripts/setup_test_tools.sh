#!/usr/bin/env bash
# Tools the test suite uses outside Python: headless Chromium, which renders report.html in tests/test_report.py.
# Idempotent and quiet: does nothing when a chromium binary exists, installs Debian's `chromium` when run as
# root with apt-get, and otherwise says how (the test then skips, naming the missing binary).
set -euo pipefail
for binary in chromium chromium-browser google-chrome; do
  command -v "$binary" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_test_tools: no chromium binary; install it (Debian: apt-get install -y chromium) or the report render test skips" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq chromium >/dev/null
echo "setup_test_tools: installed $(chromium --version 2>/dev/null || echo chromium)"
