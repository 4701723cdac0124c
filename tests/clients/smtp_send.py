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
    a = p.parse_args()
    to = a.to or ["someone@contoso.test"]
    with open(a.body, "rb") as f:
        body = f.read()

    stage = "connect"
    try:
        source = (a.source, 0) if a.source else None
        if a.implicit_tls:
            ctx = ssl.create_default_context(cafile=a.cafile)
            s = smtplib.SMTP_SSL(a.host, a.port, timeout=a.timeout, source_address=source, context=ctx)
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
            ctx = ssl.create_default_context(cafile=a.cafile)
            s.starttls(context=ctx)
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
        print(json.dumps({"ok": True, "code": code, "message": msg.decode("utf-8", "replace"), "stage": "done"}))
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
