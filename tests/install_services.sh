#!/usr/bin/env bash
# Installs the real services some tests run against, from Debian's packages, when missing:
# PostgreSQL (audit store backend), Alertmanager, promtool (Debian package prometheus), and
# chromium (the review page's browser tests drive it through Playwright; no browser download).
# Called by `make test`.
set -euo pipefail
need=()
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
command -v prometheus-alertmanager >/dev/null || need+=(prometheus-alertmanager)
command -v promtool >/dev/null || need+=(prometheus)  # promtool checks deploy/prometheus
[ -x /usr/bin/chromium ] || need+=(chromium)  # tests/integration/test_review_page.py
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install_services: need ${need[*]}; run as root or install them (apt-get install ${need[*]})" >&2
  exit 0  # the tests that need them fail loudly with the same advice
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
