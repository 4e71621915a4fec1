#!/usr/bin/env bash
# Open a peftbench report in a real headless Chromium (Debian's `chromium` package) and save a screenshot.
#   tools/screenshot_report.sh runs/quick/report/report.html report.png
# Network is disabled for the browser: a report that needed a CDN or any remote file would show broken.
set -euo pipefail
html=$(realpath "$1"); png=$(realpath -m "${2:-report.png}")
command -v chromium >/dev/null || { echo "chromium not found: apt-get install chromium" >&2; exit 2; }
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --proxy-server="http://127.0.0.1:9" \
  --window-size=1200,2600 --hide-scrollbars --screenshot="$png" "file://$html" 2>/dev/null
rm -rf "$profile"
echo "$png"
