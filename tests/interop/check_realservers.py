#!/usr/bin/env python3
"""Smoke test of tests/interop/realservers.py against real Dovecot + Postfix (run as root).

Starts a tiny introspection endpoint (token "good-token" -> alice@example.test), starts the
servers through the realservers.py CLI, then checks with Python's smtplib/imaplib:
  SMTP  AUTH XOAUTH2 good token -> 235, mail delivered into alice's Maildir
  SMTP  AUTH XOAUTH2 bad token  -> 334 <base64 {"status":"401","schemes":"bearer",...}>,
                                   empty line, 535
  SMTP  no AUTH -> RCPT rejected; AUTH'd RCPT outside the domain -> rejected
  IMAP  AUTHENTICATE XOAUTH2 good token -> fetch the delivered message
  IMAP  AUTHENTICATE XOAUTH2 bad token  -> NO
  TLS   (when started with TLS) STARTTLS port, implicit-TLS SMTP and IMAPS with the test CA
and finally stops everything and checks that no process of the instance is left and all
ports are closed. Prints PASS/FAIL lines; exits non-zero on any failure.

  python3 tests/interop/check_realservers.py [--rounds 2] [--keep] [--no-tls]
"""

import argparse
import base64
import http.server
import imaplib
import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REALSERVERS = os.path.join(HERE, "realservers.py")
sys.path.insert(0, HERE)
import realservers  # noqa: E402  (for the process scan after stop)

DOMAIN = "example.test"
ALICE = "alice@" + DOMAIN
GOOD = "good-token"
BAD = "bad-token"
NET_TIMEOUT = 15

failures = []


def report(ok, what, detail=""):
    line = "%s: %s" % ("PASS" if ok else "FAIL", what)
    if detail:
        line += " -- " + detail
    print(line, flush=True)
    if not ok:
        failures.append(what)
    return ok


def xoauth2(user, token):
    return "user=%s\x01auth=Bearer %s\x01\x01" % (user, token)


# ---------------------------------------------------------------------------- fake OAuth

class Introspect(http.server.BaseHTTPRequestHandler):
    tokens = {GOOD: ALICE}
    calls = []

    def do_GET(self):
        u = urllib.parse.urlparse(self.path)
        token = urllib.parse.parse_qs(u.query).get("token", [""])[0]
        Introspect.calls.append(token)
        if u.path != "/introspect":
            self.send_error(404)
            return
        user = self.tokens.get(token)
        body = json.dumps({"active": True, "username": user} if user
                          else {"active": False}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def start_introspection():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Introspect)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, "http://127.0.0.1:%d/introspect" % srv.server_address[1]


# ---------------------------------------------------------------------------- checks

def smtp_good(info, marker):
    s = smtplib.SMTP("127.0.0.1", info["smtp_port"], timeout=NET_TIMEOUT)
    try:
        s.ehlo("check.example.test")
        mechs = s.esmtp_features.get("auth", "")
        report("XOAUTH2" in mechs.split(), "SMTP EHLO offers AUTH XOAUTH2", "AUTH " + mechs)
        report(not s.has_extn("starttls"), "SMTP plain port offers no STARTTLS")
        code, resp = s.auth("XOAUTH2", lambda ch=None: xoauth2(ALICE, GOOD))
        report(code == 235, "SMTP AUTH XOAUTH2 good token -> 235", "%d %s" % (code, resp))
        msg = ("From: %s\r\nTo: %s\r\nSubject: interop %s\r\nMessage-ID: <%s@check>\r\n\r\n"
               "body %s\r\n" % (ALICE, ALICE, marker, marker, marker))
        refused = s.sendmail(ALICE, [ALICE], msg)
        report(not refused, "SMTP message accepted after AUTH")
        try:
            s.mail(ALICE)
            code, resp = s.rcpt("bob@elsewhere.invalid")
            report(code >= 500, "SMTP AUTH'd RCPT outside %s rejected" % DOMAIN,
                   "%d %s" % (code, resp.decode(errors="replace")))
            s.rset()
        except smtplib.SMTPException as e:
            report(False, "SMTP AUTH'd RCPT outside domain", repr(e))
        s.quit()
    finally:
        s.close()


def smtp_bad(info):
    seen = []

    def auth(ch=None):
        if ch is None:
            return xoauth2(ALICE, BAD)
        seen.append(ch)
        return ""  # the empty line that ends the exchange

    s = smtplib.SMTP("127.0.0.1", info["smtp_port"], timeout=NET_TIMEOUT)
    try:
        s.ehlo("check.example.test")
        try:
            code, resp = s.auth("XOAUTH2", auth)
            report(False, "SMTP AUTH XOAUTH2 bad token rejected", "got %d" % code)
        except smtplib.SMTPAuthenticationError as e:
            report(e.smtp_code == 535, "SMTP AUTH XOAUTH2 bad token -> 535",
                   "%d %s" % (e.smtp_code, e.smtp_error.decode(errors="replace")))
        ok = False
        detail = "no 334 challenge seen"
        if seen:
            try:
                j = json.loads(seen[0])
                ok = j.get("status") == "401" and j.get("schemes") == "bearer"
                detail = "334 challenge " + json.dumps(j)
            except ValueError:
                detail = "challenge not JSON: %r" % seen[0]
        report(ok, "SMTP bad token 334 challenge carries {status:401, schemes:bearer}", detail)
        # the session is still usable and unauthenticated: relay must be refused
        s.mail(ALICE)
        code, resp = s.rcpt(ALICE)
        report(code >= 500, "SMTP RCPT without AUTH rejected",
               "%d %s" % (code, resp.decode(errors="replace")))
        s.quit()
    finally:
        s.close()


def wait_delivery(tmp, marker, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, REALSERVERS, "maildir", "--dir", tmp,
                              "--user", ALICE], capture_output=True, timeout=30)
        for f in json.loads(out.stdout or b"[]"):
            try:
                with open(f, "rb") as fh:
                    if marker.encode() in fh.read():
                        return f
            except FileNotFoundError:
                continue
        time.sleep(0.1)
    return None


def imap_login(port, token, use_ssl=False, ctx=None):
    """Returns (imap or None, challenges seen, error text)."""
    seen = []

    def auth(ch):
        if ch:
            seen.append(ch)
            return b""
        return xoauth2(ALICE, token).encode()

    if use_ssl:
        m = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=NET_TIMEOUT)
    else:
        m = imaplib.IMAP4("127.0.0.1", port, timeout=NET_TIMEOUT)
    try:
        typ, data = m.authenticate("XOAUTH2", auth)
        return m, seen, "%s %s" % (typ, data)
    except imaplib.IMAP4.error as e:
        try:
            m.logout()
        except Exception:
            pass
        return None, seen, str(e)


def imap_checks(info, marker):
    pre = imaplib.IMAP4("127.0.0.1", info["imap_port"], timeout=NET_TIMEOUT)
    report("AUTH=XOAUTH2" in pre.capabilities, "IMAP greeting offers AUTH=XOAUTH2 without TLS",
           " ".join(pre.capabilities))
    pre.logout()
    m, _, detail = imap_login(info["imap_port"], GOOD)
    if not report(m is not None, "IMAP AUTHENTICATE XOAUTH2 good token -> OK", detail):
        return
    try:
        typ, _ = m.select("INBOX")
        typ, data = m.search(None, "SUBJECT", '"%s"' % marker)
        nums = data[0].split() if typ == "OK" else []
        body = b""
        if nums:
            typ, fetched = m.fetch(nums[-1], "(RFC822)")
            body = fetched[0][1] if typ == "OK" and fetched and fetched[0] else b""
        report(marker.encode() in body, "IMAP fetched the delivered message",
               "%d match(es), %d bytes" % (len(nums), len(body)))
        m.logout()
    except Exception as e:
        report(False, "IMAP select/search/fetch", repr(e))

    t0 = time.monotonic()
    m, seen, detail = imap_login(info["imap_port"], BAD)
    report(m is None and ("AUTHENTICATIONFAILED" in detail or "NO" in detail or
                          "failed" in detail.lower()),
           "IMAP AUTHENTICATE XOAUTH2 bad token -> NO", detail)
    if seen:
        try:
            j = json.loads(seen[0])
            report(j.get("status") == "401", "IMAP bad token challenge is the 401 JSON",
                   json.dumps(j))
        except ValueError:
            report(False, "IMAP bad token challenge is JSON", repr(seen[0]))
    # auth penalty is off: a good login right after bad ones is fast
    for _ in range(3):
        imap_login(info["imap_port"], BAD)
    t1 = time.monotonic()
    m, _, detail = imap_login(info["imap_port"], GOOD)
    dt = time.monotonic() - t1
    report(m is not None and dt < 1.0, "IMAP good login after 4 bad ones is fast (no penalty)",
           "%.3fs (4 bad logins took %.3fs, mostly imaplib's own ~0.5 s per failure)"
           % (dt, t1 - t0))
    if m:
        m.logout()


def tls_checks(info, marker):
    ctx = ssl.create_default_context(cafile=info["ca_cert"])
    # STARTTLS port: no AUTH before TLS, AUTH after (like Office 365 on 587)
    try:
        s = smtplib.SMTP("127.0.0.1", info["smtp_starttls_port"], timeout=NET_TIMEOUT)
        s.ehlo("check.example.test")
        report(s.has_extn("starttls") and not s.has_extn("auth"),
               "SMTP STARTTLS port: STARTTLS offered, AUTH hidden before TLS")
        s.starttls(context=ctx)
        s.ehlo("check.example.test")
        code, resp = s.auth("XOAUTH2", lambda ch=None: xoauth2(ALICE, GOOD))
        report(code == 235, "SMTP STARTTLS + AUTH XOAUTH2 (CA-verified cert) -> 235",
               s.sock.version())
        s.sendmail(ALICE, [ALICE], "Subject: tls %s\r\n\r\nstarttls %s\r\n" % (marker, marker))
        s.quit()
    except Exception as e:
        report(False, "SMTP STARTTLS port", repr(e))
    try:
        s = smtplib.SMTP_SSL("127.0.0.1", info["smtps_port"], context=ctx, timeout=NET_TIMEOUT)
        s.ehlo("check.example.test")
        code, resp = s.auth("XOAUTH2", lambda ch=None: xoauth2(ALICE, GOOD))
        report(code == 235, "SMTPS (implicit TLS) AUTH XOAUTH2 -> 235", s.sock.version())
        s.quit()
    except Exception as e:
        report(False, "SMTPS port", repr(e))
    m, _, detail = imap_login(info["imaps_port"], GOOD, use_ssl=True, ctx=ctx)
    report(m is not None, "IMAPS AUTHENTICATE XOAUTH2 -> OK", detail)
    if m:
        m.logout()


def ports_of(info):
    return [info[k] for k in ("smtp_port", "imap_port", "lmtp_port", "auth_port",
                              "smtp_starttls_port", "smtps_port", "imaps_port") if info.get(k)]


def one_round(n, args, url):
    print("=== round %d" % n, flush=True)
    tmp = tempfile.mkdtemp(prefix="mfd-interop-")
    info = None
    try:
        cmd = [sys.executable, REALSERVERS, "start", "--dir", tmp, "--introspect-url", url,
               "--domain", DOMAIN]
        if args.no_tls:
            cmd.append("--no-tls")
        t0 = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, timeout=120)
        dt = time.monotonic() - t0
        lines = p.stdout.decode().strip().splitlines()
        if not report(p.returncode == 0 and len(lines) == 1, "realservers.py start",
                      "%.2fs rc=%d %s" % (dt, p.returncode, p.stderr.decode()[-3000:])):
            return
        info = json.loads(lines[0])
        print("INFO: " + lines[0], flush=True)
        marker = uuid.uuid4().hex
        smtp_good(info, marker)
        f = wait_delivery(tmp, marker)
        report(f is not None, "message delivered into alice's Maildir (LMTP)", f or "")
        smtp_bad(info)
        imap_checks(info, marker)
        if info.get("tls"):
            tls_checks(info, marker)
        report(GOOD in Introspect.calls and BAD in Introspect.calls,
               "Dovecot asked the introspection endpoint", "%d calls" % len(Introspect.calls))
    except Exception as e:
        report(False, "round %d raised" % n, repr(e))
    finally:
        state = realservers._load_state(tmp)
        before = realservers._instance_pids(state) if state else {}
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, REALSERVERS, "stop", "--dir", tmp],
                           capture_output=True, timeout=120)
        dt = time.monotonic() - t0
        report(p.returncode == 0, "realservers.py stop",
               "%.2fs %s %s" % (dt, p.stdout.decode().strip(), p.stderr.decode()[-2000:]))
        left = realservers._alive(before)
        if state:
            left.update(realservers._instance_pids(state))
        report(not left, "no dovecot/postfix process of this instance left",
               "%d were running; left: %s" % (len(before), [realservers._cmdline(x)
                                                            for x in left]))
        if info:
            open_ports = [pt for pt in ports_of(info) if realservers._port_open(pt)]
            report(not open_ports, "all instance ports closed", str(open_ports))
        if args.keep:
            print("INFO: kept " + tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (logs)")
    ap.add_argument("--no-tls", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("FAIL: must run as root")
        return 2
    srv, url = start_introspection()
    try:
        for n in range(1, args.rounds + 1):
            one_round(n, args, url)
    finally:
        srv.shutdown()
    if failures:
        print("RESULT: FAIL (%d): %s" % (len(failures), "; ".join(failures)))
        return 1
    print("RESULT: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
