#!/usr/bin/env bash
# Fuzzes the parsers for a bounded time: SMTP commands, AUTH decoding, the DATA decoder, the
# header rewrite, the recipients rewrite for HTTP APIs and scan-to-folder file names. Any crash fails this script; its
# input is left in fuzz/artifacts/ and becomes a regression test in the unit tests (see
# src/smtp/command.rs for an example).
#   fuzz/run.sh            # 15 s per target
#   FUZZ_SECONDS=300 fuzz/run.sh
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-15}"
cargo fuzz build -O
for target in smtp_command smtp_auth data_decoder header_rewrite api_recipients filenames; do
    echo "fuzz: $target for ${seconds}s"
    cargo fuzz run -O "$target" -- -max_total_time="$seconds" -print_final_stats=0 2>&1 | grep -E "^(Done|==|SUMMARY|thread)" || true
    if compgen -G "artifacts/$target/crash-*" >/dev/null; then
        echo "fuzz: $target crashed; inputs in fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
echo "fuzz: no crash"
