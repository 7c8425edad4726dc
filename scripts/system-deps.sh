#!/usr/bin/env bash
# Debian packages the tests use: headless Chromium opens the HTML report, git makes test repos,
# PostgreSQL's server binaries run the mlflow server's backend store as in production (Debian keeps
# initdb in /usr/lib/postgresql/<version>/bin, off PATH; without it the tests fall back to SQLite).
# Installed only when missing and only where we may (root, or passwordless sudo).
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v git >/dev/null 2>&1 || missing+=(git)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1 ||
  missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "note: ${missing[*]} missing and no root; the tests that need them will skip" >&2
  exit 0
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
