#!/bin/sh
# Install the real servers and clients used by the tests (Debian 12, run as root):
# Dovecot and Postfix for interop, swaks (with the Perl TLS and SASL modules it needs), curl,
# prometheus for promtool (deploy/check.py checks the alert rules with it), and strace
# (tests/it/durability.rs checks that every file of a message is synced before its 250) and
# faketime (the same file steps the relay's wall clock); libssl-dev and pkg-config, to build
# the legacy-TLS listener against the system OpenSSL 3; chromium and chromium-driver, the
# headless browser tests/it/status_page.rs clicks through the status page with (selenium
# drives Debian's /usr/bin/chromedriver, so nothing is downloaded at test time).
# Idempotent: does nothing when every package is already installed.
# Only Debian's own package mirrors are needed.
set -eu

PKGS="dovecot-imapd dovecot-lmtpd postfix swaks openssl curl libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl prometheus strace faketime libssl-dev pkg-config chromium chromium-driver"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    echo "install.sh: all packages already installed ($PKGS)"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: must run as root (missing:$missing)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Postfix: no system mail configuration; the tests run their own instance.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
echo "postfix postfix/mailname string localhost" | debconf-set-selections

apt-get update
# shellcheck disable=SC2086
apt-get install -y --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $missing

# The packages' post-install scripts may start the system services. The tests never
# use them; stop them so they do not hold ports 25/143/etc. (no-op without systemd).
for svc in dovecot postfix prometheus; do
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl stop "$svc" >/dev/null 2>&1 || true
        systemctl disable "$svc" >/dev/null 2>&1 || true
    elif command -v service >/dev/null 2>&1; then
        service "$svc" stop >/dev/null 2>&1 || true
    fi
done

echo "install.sh: installed:$missing"
dovecot --version || true
postconf -d mail_version 2>/dev/null || true
