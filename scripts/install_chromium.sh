#!/usr/bin/env bash
# Installs Debian's chromium for the real-browser test. Without root or apt the browser tests skip.
set -u
if command -v chromium >/dev/null 2>&1; then exit 0; fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: no apt-get here; the browser tests will be skipped" >&2; exit 0
fi
$SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
  && echo "install_chromium: $(chromium --version)" \
  || echo "install_chromium: could not install chromium; the browser tests will be skipped" >&2
exit 0
