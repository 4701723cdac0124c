#!/usr/bin/env bash
# The relay benchmark (benches/relay.rs) against the Python peer emailproxy, the "Email OAuth 2.0
# Proxy" from PyPI, in the relay's place: same load generator, same in-process XOAUTH2 sink and
# token endpoint, same scenarios, on loopback.
#
#   benches/peer/emailproxy.sh [bench filter...]    # install if missing, then cargo bench
#   benches/peer/emailproxy.sh serve PORT SINK_PORT TOKEN_URL CA_FILE DIR
#                                                   # what the bench starts (MFD_BENCH_PEER)
#
# emailproxy goes into a venv at $EMAILPROXY_VENV (default /tmp/emailproxy-venv), version
# $EMAILPROXY_VERSION if set (else the newest). It gets benches/peer/emailproxy.config.template
# with the bench's ports filled in: plain SMTP in, STARTTLS out (it has no plain upstream, so the
# sink offers STARTTLS and emailproxy trusts the sink's certificate through SSL_CERT_FILE), the
# client-credentials flow against the bench's token endpoint. The devices log in as
# scans@contoso.test. Each scenario stops starting messages after $MFD_BENCH_SECONDS (default 60)
# because one login costs emailproxy ~0.15 s of PBKDF2; msg/s is over the messages it completed.
# Paths must not contain spaces (the bench splits MFD_BENCH_PEER on whitespace).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
venv=${EMAILPROXY_VENV:-/tmp/emailproxy-venv}

if [ "${1:-}" = serve ]; then
    [ $# -eq 6 ] || { echo "usage: $0 serve PORT SINK_PORT TOKEN_URL CA_FILE DIR" >&2; exit 2; }
    port=$2 sink_port=$3 token_url=$4 ca_file=$5 dir=$6
    [ -s "$ca_file" ] || { echo "$0: no sink certificate; run with MFD_BENCH_UPSTREAM_TLS=starttls" >&2; exit 2; }
    sed -e "s|{port}|$port|g" -e "s|{sink_port}|$sink_port|g" -e "s|{token_url}|$token_url|g" \
        "$here/emailproxy.config.template" >"$dir/emailproxy.config"
    # emailproxy verifies the upstream certificate with Python's default context, which reads
    # SSL_CERT_FILE; the sink's certificate is for 127.0.0.1.
    export SSL_CERT_FILE=$ca_file
    # exec: the bench samples the memory of the process it started.
    exec "$venv/bin/emailproxy" --no-gui --config-file "$dir/emailproxy.config" --log-file "$dir/emailproxy.log"
fi

if [ ! -x "$venv/bin/emailproxy" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "emailproxy${EMAILPROXY_VERSION:+==$EMAILPROXY_VERSION}"
fi
echo "emailproxy $("$venv/bin/pip" show emailproxy | sed -n 's/^Version: //p') ($("$venv/bin/emailproxy" --version)), $("$venv/bin/python" --version), $("$venv/bin/python" -c 'import ssl; print(ssl.OPENSSL_VERSION)')"

cd "$here/../.."
export MFD_BENCH_PEER="$here/emailproxy.sh serve {port} {sink_port} {token_url} {ca_file} {dir}"
export MFD_BENCH_UPSTREAM_TLS=starttls
export MFD_BENCH_USER=scans@contoso.test
export MFD_BENCH_PASSWORD=${MFD_BENCH_PASSWORD:-bench-password}
export MFD_BENCH_SECONDS=${MFD_BENCH_SECONDS:-60}
exec cargo bench --bench relay -- "$@"
