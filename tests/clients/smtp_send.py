#!/usr/bin/env python3
"""Sends one message with Python's smtplib, the way a printer or scanner would.

Prints one JSON line: {"ok": bool, "code": int|null, "message": str, "stage": str}.
Used by the Rust integration tests as an independent, real SMTP client.
"""
import argparse
import json
import smtplib
import ssl
import sys


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source", default=None, help="source address to connect from")
    p.add_argument("--body", required=True, help="file with the message (sent as bytes)")
    p.add_argument("--from", dest="sender", default="scanner@printer.local")
    p.add_argument("--to", action="append", default=[])
    p.add_argument("--helo", action="store_true", help="HELO instead of EHLO")
    p.add_argument("--starttls", action="store_true")
    p.add_argument("--implicit-tls", action="store_true")
    p.add_argument("--cafile")
    p.add_argument("--auth", choices=["PLAIN", "LOGIN"])
    p.add_argument("--initial-response", choices=["yes", "no"], default="yes")
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--tls-version", choices=["1.0", "1.1", "1.2", "1.3"],
                   help="offer this TLS version only, like an old printer")
    p.add_argument("--ciphers", help="offer these (TLS 1.2 and older) suites only, e.g. AES128-SHA")
    a = p.parse_args()
    to = a.to or ["someone@contoso.test"]
    with open(a.body, "rb") as f:
        body = f.read()

    def tls_context():
        ctx = ssl.create_default_context(cafile=a.cafile)
        if a.tls_version:
            # An old device: one protocol version, old suites; OpenSSL 3 needs security level 0.
            v = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1,
                 "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[a.tls_version]
            ctx.minimum_version = v
            ctx.maximum_version = v
        if a.ciphers:
            ctx.set_ciphers(a.ciphers + ":@SECLEVEL=0")
        elif a.tls_version in ("1.0", "1.1"):
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        return ctx

    negotiated = {}

    def note_tls(sock):
        negotiated["tls_version"] = sock.version()
        negotiated["cipher"] = sock.cipher()[0]

    stage = "connect"
    try:
        source = (a.source, 0) if a.source else None
        if a.implicit_tls:
            s = smtplib.SMTP_SSL(a.host, a.port, timeout=a.timeout, source_address=source, context=tls_context())
            note_tls(s.sock)
        else:
            s = smtplib.SMTP(a.host, a.port, timeout=a.timeout, source_address=source)
        stage = "hello"
        if a.helo:
            code, msg = s.helo("printer")
        else:
            code, msg = s.ehlo("printer.lan")
        if code != 250:
            raise smtplib.SMTPResponseException(code, msg)
        if a.starttls:
            stage = "starttls"
            s.starttls(context=tls_context())
            note_tls(s.sock)
            s.ehlo("printer.lan")
        if a.auth:
            stage = "auth"
            s.user, s.password = a.user, a.password
            mech = s.auth_plain if a.auth == "PLAIN" else s.auth_login
            s.auth(a.auth, mech, initial_response_ok=(a.initial_response == "yes"))
        stage = "mail"
        opts = ["BODY=8BITMIME"] if any(b > 127 for b in body) and s.has_extn("8bitmime") else []
        if s.has_extn("size"):
            opts.append("SIZE=%d" % len(body))
        code, msg = s.mail(a.sender, opts)
        if code != 250:
            raise smtplib.SMTPResponseException(code, msg)
        stage = "rcpt"
        refused = {}
        for r in to:
            code, msg = s.rcpt(r)
            if code not in (250, 251):
                refused[r] = (code, msg)
        if len(refused) == len(to):
            code, msg = next(iter(refused.values()))
            raise smtplib.SMTPResponseException(code, msg)
        stage = "data"
        code, msg = s.data(body)
        if code != 250:
            raise smtplib.SMTPResponseException(code, msg)
        stage = "quit"
        try:
            s.quit()
        except smtplib.SMTPException:
            pass
        print(json.dumps({"ok": True, "code": code, "message": msg.decode("utf-8", "replace"), "stage": "done", **negotiated}))
    except smtplib.SMTPRecipientsRefused as e:
        code, msg = next(iter(e.recipients.values()))
        print(json.dumps({"ok": False, "code": code, "message": msg.decode("utf-8", "replace"), "stage": stage}))
    except smtplib.SMTPResponseException as e:
        msg = e.smtp_error.decode("utf-8", "replace") if isinstance(e.smtp_error, bytes) else str(e.smtp_error)
        print(json.dumps({"ok": False, "code": e.smtp_code, "message": msg, "stage": stage}))
    except (smtplib.SMTPException, OSError) as e:
        print(json.dumps({"ok": False, "code": None, "message": f"{type(e).__name__}: {e}", "stage": stage}))


if __name__ == "__main__":
    sys.exit(main())
