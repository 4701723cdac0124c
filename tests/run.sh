#!/usr/bin/env bash
# Runs every test of mfd-relay on this machine, after installing what the tests need:
# swaks, Postfix and Dovecot (Debian packages, when run as root) and nothing from the network
# at test time. Everything the tests start listens on 127.0.0.1 and is stopped by the test.
#   tests/run.sh              # all tests
#   tests/run.sh --test it spine::   # one file's tests (arguments go to `cargo test`)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    tests/interop/install.sh
    # deploy/check.py validates the Kubernetes manifests against the API models with it.
    python3 -m pip install --quiet --disable-pip-version-check kubernetes \
        || echo "tests/run.sh: could not install the kubernetes models; deploy/check.py skips that check" >&2
    # tests/it/status_page.rs drives Chromium through the status page with selenium (it uses
    # Debian's chromedriver from install.sh; selenium-manager downloads nothing).
    python3 -m pip install --quiet --disable-pip-version-check selenium \
        || echo "tests/run.sh: could not install selenium; tests/it/status_page.rs will fail" >&2
else
    echo "tests/run.sh: not root, so not installing packages; the interop tests need swaks, postfix, dovecot-imapd and dovecot-lmtpd, the status-page test chromium, chromium-driver and python3-selenium (pip)" >&2
fi

# tests/it/abuse.rs opens 2,000 connections to check the per-address limit.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo fmt --all -- --check
# ARCHITECTURE.md: the top-level modules of src/ import each other without a cycle.
python3 tests/module_cycles.py
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked "$@"
