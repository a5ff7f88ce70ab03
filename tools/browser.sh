#!/usr/bin/env bash
# Chromium for the browser test (tests/test_browser.py): Debian's package, installed only when it is
# missing and we are root. Playwright itself comes from requirements.txt; its browser download
# (`playwright install`) is never used.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "tools/browser.sh: /usr/bin/chromium is missing and cannot be installed here (needs root and apt-get);" \
       "the browser test will be skipped." >&2
  exit 1
fi
echo "Installing chromium for the browser test (about a minute)..." >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >&2
