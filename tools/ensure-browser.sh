#!/usr/bin/env bash
# The status page's test drives a real headless browser: Debian's chromium
# and its WebDriver.  Install them when missing and when we may (as root),
# saying so first: it is a large download.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "The status page's test needs a browser: installing Debian's chromium and chromium-driver" \
        "(apt-get: several hundred MB; install them beforehand to skip this)."
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
else
    echo "the status page's browser test needs chromium and chromium-driver:" >&2
    echo "  sudo apt-get install chromium chromium-driver" >&2
fi
