#!/usr/bin/env bash
# Headless Chromium + its WebDriver for the web-page tests (tests/test_web.py). Idempotent: does nothing when both
# are already on PATH. Debian/Ubuntu (apt-get); run as root or with sudo. Offline machines skip the browser tests
# (they fail instead when env CI is set).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  echo "chromium and chromedriver already installed"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
chromium --version
chromedriver --version
