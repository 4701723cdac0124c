#!/usr/bin/env python3
"""Start/stop a real Dovecot + Postfix pair on 127.0.0.1 for mfd-relay interop tests.

Everything (configs, queue, mail, logs, sockets, certificates) lives under one directory
given by the caller; the system's /etc/dovecot and /etc/postfix are not modified.

* Dovecot: IMAP (+ IMAPS with --tls), LMTP and its SASL auth service on TCP; `passdb oauth2`
  validates bearer tokens against the caller's introspection endpoint
  (GET <url>?token=<token>, answer {"active":true,"username":"<email>"}).
* Postfix: an smtpd on a loopback port offering AUTH XOAUTH2/OAUTHBEARER (SASL by Dovecot)
  without TLS, accepting mail only from authenticated clients and only for recipients in the
  test domain, delivering them by LMTP into Dovecot Maildirs (DIR/mail/<email>/{new,cur}).
  With --tls also a STARTTLS port (TLS required before AUTH/MAIL, like Office 365 on 587)
  and an implicit-TLS port (like Gmail on 465), with a throw-away CA + server cert.

CLI (must run as root; stdlib only):
  realservers.py start --dir DIR --introspect-url URL [--domain example.test]
                       [--smtp-port N --imap-port N --lmtp-port N --auth-port N]
                       [--tls | --no-tls] [--smtp-starttls-port N --smtps-port N --imaps-port N]
                       [--auth-failure-delay SECS] [--message-size-limit BYTES] [--timeout SECS]
      -> prints one JSON line describing the instance (also saved as DIR/state.json)
  realservers.py stop --dir DIR [--timeout SECS]      -> one JSON line, exit 0 when nothing is left
  realservers.py maildir --dir DIR --user EMAIL       -> JSON list of delivered message files
  realservers.py status --dir DIR                     -> JSON: which processes are alive

From Python: `import realservers; info = realservers.start(dir, url); realservers.stop(dir)`.
"""

import argparse
import json
import os
import pwd
import grp
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

STATE_FILE = "state.json"


class HarnessError(Exception):
    pass


# ----------------------------------------------------------------------------------------
# small helpers

def _log(msg):
    print("realservers: " + msg, file=sys.stderr, flush=True)


def _run(cmd, timeout, env=None, log_path=None):
    """Run a command with stdin closed and output sent to a temporary file, never to a
    pipe: daemons forked by the command (dovecot, postfix master) inherit its stdout, and a
    pipe would stay open until they exit -- for us, and for a caller reading our stdout."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as outf:
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=outf,
                               stderr=subprocess.STDOUT, timeout=timeout, env=env,
                               start_new_session=True)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = None
        outf.seek(0)
        out = outf.read().decode("utf-8", "replace")
    if log_path:
        with open(log_path, "a") as f:
            f.write("$ %s  (rc=%s, %.3fs)\n%s" % (" ".join(cmd), rc, time.monotonic() - t0, out))
    if rc is None:
        raise HarnessError("timeout after %ss: %s\n%s" % (timeout, " ".join(cmd), out))
    return rc, out


def _which(name):
    for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return shutil.which(name)


def _free_ports(n, avoid=()):
    """n distinct free TCP ports on 127.0.0.1 (kept bound until all are chosen)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            if port not in avoid and port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _port_open(port, timeout=0.5):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _listen_count(port):
    """Number of TCP sockets in LISTEN state on `port` (any address). Postfix's master
    sets SO_REUSEPORT, so a second Postfix (both root) binds a port that is already
    listening without any error and the kernel then splits connections between them."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        n += 1
        except OSError:
            pass
    return n


class _PortLock:
    """Serializes port choice + start-up between harness processes on this host, so two
    parallel tests cannot pick the same free port (see _listen_count for why that would
    go unnoticed). The lock file is the only thing written outside DIR."""
    PATH = "/tmp/mfd-relay-interop.ports.lock"

    def __init__(self, deadline):
        self.deadline = deadline
        self.f = None

    def __enter__(self):
        import fcntl
        self.f = open(self.PATH, "a")
        while True:
            try:
                fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > self.deadline:
                    self.f.close()
                    raise HarnessError("timeout waiting for " + self.PATH)
                time.sleep(0.05)

    def __exit__(self, *exc):
        self.f.close()  # releases the flock


def _wait_banner(port, prefix, deadline, cafile=None):
    """Wait until 127.0.0.1:port accepts and greets with `prefix` (bytes), or raise.
    With `cafile`, the port speaks implicit TLS: handshake first (verifying the cert)."""
    import ssl
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                raw.settimeout(max(0.5, min(5.0, deadline - time.monotonic())))
                s = raw
                if cafile:
                    ctx = ssl.create_default_context(cafile=cafile)
                    s = ctx.wrap_socket(raw, server_hostname="localhost")
                data = b""
                while b"\n" not in data:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(prefix):
                    return
                last = "unexpected greeting %r" % data[:200]
        except (OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.05)
    raise HarnessError("port %d not ready (%s)" % (port, last))


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _proc_stat(pid):
    """(ppid, starttime) of a live pid, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()
    if rest[0] == "Z":
        return None  # zombie: gone for our purposes
    return int(rest[1]), int(rest[19])


def _all_pids():
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            out.append(int(name))
    return out


def _descendants(roots):
    """Live pids of roots and all their descendants, as {pid: starttime}."""
    table = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st:
            table[pid] = st
    result = {}
    todo = [p for p in roots if p in table]
    while todo:
        p = todo.pop()
        if p in result:
            continue
        result[p] = table[p][1]
        todo.extend(c for c, (pp, _) in table.items() if pp == p)
    return result


def _pids_under_dir(path):
    """Live pids whose cwd is inside `path` (Postfix daemons chdir to their queue dir,
    Dovecot processes to base_dir)."""
    path = os.path.realpath(path)
    out = {}
    for pid in _all_pids():
        try:
            cwd = os.readlink("/proc/%d/cwd" % pid)
        except OSError:
            continue
        if cwd == path or cwd.startswith((path + os.sep, path + " (deleted)")):
            st = _proc_stat(pid)
            if st:
                out[pid] = st[1]
    return out


def _alive(pids):
    """Subset of {pid: starttime} still alive with the same start time (no pid reuse)."""
    out = {}
    for pid, start in pids.items():
        st = _proc_stat(pid)
        if st and st[1] == start:
            out[pid] = start
    return out


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "?"


def _tail(path, n=40):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no %s)" % path


def _check_traversable(path, user):
    """Processes running as `user` (mail, postfix) must reach DIR."""
    pw = pwd.getpwnam(user)
    p = os.path.realpath(path)
    parts = []
    while True:
        parts.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in parts[1:]:  # DIR itself is chmod'ed by us
        st = os.stat(d)
        if st.st_uid == pw.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == pw.pw_gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            raise HarnessError(
                "%s is not traversable by user %r (mode %o); put --dir under /tmp or "
                "chmod o+x the parents" % (d, user, st.st_mode & 0o7777))


def dovecot_version():
    rc, out = _run([_which("dovecot") or "dovecot", "--version"], timeout=10)
    if rc != 0:
        raise HarnessError("dovecot --version failed: " + out)
    return out.strip()


def postfix_version():
    rc, out = _run([_which("postconf") or "postconf", "-d", "-h", "mail_version"], timeout=10)
    if rc != 0:
        raise HarnessError("postconf failed: " + out)
    return out.strip()


def _paths(d):
    d = os.path.realpath(d)
    return {
        "dir": d,
        "dovecot_conf": os.path.join(d, "dovecot.conf"),
        "oauth2_conf": os.path.join(d, "dovecot-oauth2.conf.ext"),
        "dovecot_state": os.path.join(d, "dovecot-state"),
        "dovecot_log": os.path.join(d, "dovecot.log"),
        "mail": os.path.join(d, "mail"),
        "home": os.path.join(d, "home"),
        "postfix_conf": os.path.join(d, "postfix"),
        "postfix_queue": os.path.join(d, "postfix-queue"),
        "postfix_data": os.path.join(d, "postfix-data"),
        "postfix_log": os.path.join(d, "postfix.log"),
        "harness_log": os.path.join(d, "harness.log"),
        "tls": os.path.join(d, "tls"),
        "state": os.path.join(d, STATE_FILE),
    }


def _load_state(d):
    try:
        with open(_paths(d)["state"]) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _save_state(d, state):
    p = _paths(d)["state"]
    tmp = p + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.replace(tmp, p)


# ----------------------------------------------------------------------------------------
# TLS material: a throw-away CA and a server cert for localhost/127.0.0.1 signed by it
# (a self-signed CA:TRUE cert used directly as the server cert is refused by rustls/webpki).

def _make_tls(tls_dir, domain, log_path):
    openssl = _which("openssl")
    if not openssl:
        return None
    os.makedirs(tls_dir, exist_ok=True)
    ca_key, ca_crt = os.path.join(tls_dir, "ca.key"), os.path.join(tls_dir, "ca.pem")
    key, csr, crt = (os.path.join(tls_dir, n) for n in ("server.key", "server.csr", "server.pem"))
    ext = os.path.join(tls_dir, "server.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints = critical, CA:FALSE\n"
                "keyUsage = critical, digitalSignature, keyEncipherment\n"
                "extendedKeyUsage = serverAuth\n"
                "subjectKeyIdentifier = hash\n"
                "authorityKeyIdentifier = keyid\n"
                "subjectAltName = DNS:localhost, IP:127.0.0.1, DNS:mx.%s, DNS:imap.%s\n"
                % (domain, domain))
    steps = [
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", ca_key, "-out", ca_crt, "-days", "30",
         "-subj", "/CN=mfd-relay interop test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-CAcreateserial", "-out", crt, "-days", "30", "-extfile", ext],
    ]
    for cmd in steps:
        rc, out = _run(cmd, timeout=30, log_path=log_path)
        if rc != 0:
            raise HarnessError("openssl failed: %s\n%s" % (" ".join(cmd), out))
    os.chmod(key, 0o600)
    os.chmod(ca_key, 0o600)
    return {"ca_cert": ca_crt, "cert": crt, "key": key}


# ----------------------------------------------------------------------------------------
# configuration files

def _dovecot_conf(p, base_dir, ports, domain, tls, auth_failure_delay):
    ssl_lines = "ssl = no\n"
    imaps = "    inet_listener imaps {\n      port = 0\n    }\n"
    if tls:
        ssl_lines = ("ssl = yes\n"
                     "ssl_cert = <%s\n"
                     "ssl_key = <%s\n"
                     "ssl_min_protocol = TLSv1.2\n" % (tls["cert"], tls["key"]))
        imaps = ("    inet_listener imaps {\n      address = 127.0.0.1\n      port = %d\n"
                 "      ssl = yes\n    }\n" % ports["imaps"])
    return """# generated by tests/interop/realservers.py -- do not edit
base_dir = {base_dir}
state_dir = {state_dir}
instance_name = mfd-relay-interop
protocols = imap lmtp
listen = 127.0.0.1
log_path = {log}
info_log_path = {log}
debug_log_path = {log}
auth_verbose = yes
{ssl}
# cleartext AUTH on loopback (2.3 name; 2.4 calls it auth_allow_cleartext)
disable_plaintext_auth = no
auth_mechanisms = xoauth2 oauthbearer
auth_failure_delay = {delay}
auth_cache_size = 0
hostname = imap.{domain}
postmaster_address = postmaster@{domain}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:{mail}/%u
mail_fsync = always
mailbox_list_index = no
lmtp_save_to_detail_mailbox = no

passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {oauth2}
}}
userdb {{
  driver = static
  args = uid=mail gid=mail home={home}/%u allow_all_users=yes
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
{imaps}}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp}
  }}
}}
service auth {{
  # Postfix's smtpd_sasl_path = inet:127.0.0.1:{auth}
  inet_listener {{
    address = 127.0.0.1
    port = {auth}
  }}
}}
service anvil {{
  # no auth penalty: tests send bad tokens on purpose
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap {{
  process_limit = 256
}}
""".format(base_dir=base_dir, state_dir=p["dovecot_state"], log=p["dovecot_log"],
           ssl=ssl_lines, delay=auth_failure_delay, domain=domain, mail=p["mail"],
           home=p["home"], oauth2=p["oauth2_conf"], imap=ports["imap"], imaps=imaps,
           lmtp=ports["lmtp"], auth=ports["auth"])


def _normalize_introspect_url(url):
    if not re.match(r"^https?://", url):
        raise HarnessError("--introspect-url must be http(s)://...: %r" % url)
    if "?" not in url:
        url += "?token="
    elif not url.endswith("="):
        raise HarnessError("--introspect-url with a query must end with '=' "
                           "(Dovecot appends the token): %r" % url)
    return url


def _oauth2_conf(url):
    return """# generated by tests/interop/realservers.py
introspection_mode = get
introspection_url = {url}
force_introspection = yes
username_attribute = username
active_attribute = active
active_value = true
timeout_msecs = 10000
""".format(url=url)


def _postfix_main_cf(p, ports, domain, tls, message_size_limit):
    tls_lines = ""
    if tls:
        tls_lines = ("smtpd_tls_cert_file = %s\nsmtpd_tls_key_file = %s\n"
                     "smtpd_tls_mandatory_protocols = >=TLSv1.2\n"
                     "smtpd_tls_protocols = >=TLSv1.2\n" % (tls["cert"], tls["key"]))
    return """# generated by tests/interop/realservers.py -- do not edit
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = /var, /dev/stdout, {dir}
maillog_file = {log}
syslog_name = postfix-mfd-interop
myhostname = mx.{domain}
mydomain = {domain}
myorigin = $mydomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
relay_domains =
alias_maps =
alias_database =
local_recipient_maps =
local_transport = error:5.1.1 local delivery disabled in the interop instance
default_transport = error:5.7.1 outside delivery disabled in the interop instance
virtual_mailbox_domains = {domain}
virtual_mailbox_maps =
virtual_transport = lmtp:inet:127.0.0.1:{lmtp}
biff = no
append_dot_mydomain = no
smtputf8_enable = yes
message_size_limit = {size}
smtpd_banner = $myhostname ESMTP mfd-relay-interop
smtpd_peername_lookup = no
smtpd_tls_security_level = none
smtpd_tls_auth_only = no
{tls}smtpd_sasl_auth_enable = no
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:{auth}
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
broken_sasl_auth_clients = no
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
smtpd_sender_restrictions =
smtpd_client_restrictions =
# deliver quickly and retry quickly
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 5s
lmtp_connect_timeout = 5s
""".format(queue=p["postfix_queue"], data=p["postfix_data"], dir=p["dir"],
           log=p["postfix_log"], domain=domain, lmtp=ports["lmtp"], auth=ports["auth"],
           tls=tls_lines, size=int(message_size_limit))


def _postfix_master_cf(ports, tls):
    lines = [
        "# generated by tests/interop/realservers.py -- do not edit",
        "# service type  private unpriv  chroot  wakeup  maxproc command + args",
        "127.0.0.1:%d inet n - n - - smtpd" % ports["smtp"],
        "  -o smtpd_sasl_auth_enable=yes",
        "  -o syslog_name=postfix-mfd-interop/plain",
    ]
    if tls:
        lines += [
            "127.0.0.1:%d inet n - n - - smtpd" % ports["smtp_starttls"],
            "  -o smtpd_sasl_auth_enable=yes",
            "  -o smtpd_tls_security_level=encrypt",
            "  -o smtpd_tls_auth_only=yes",
            "  -o syslog_name=postfix-mfd-interop/starttls",
            "127.0.0.1:%d inet n - n - - smtpd" % ports["smtps"],
            "  -o smtpd_sasl_auth_enable=yes",
            "  -o smtpd_tls_wrappermode=yes",
            "  -o smtpd_tls_security_level=encrypt",
            "  -o syslog_name=postfix-mfd-interop/smtps",
            "tlsmgr    unix  -       -       n       1000?   1       tlsmgr",
        ]
    lines += [
        "cleanup   unix  n       -       n       -       0       cleanup",
        "qmgr      unix  n       -       n       1       1       qmgr",
        "rewrite   unix  -       -       n       -       -       trivial-rewrite",
        "bounce    unix  -       -       n       -       0       bounce",
        "defer     unix  -       -       n       -       0       bounce",
        "trace     unix  -       -       n       -       0       bounce",
        "verify    unix  -       -       n       -       1       verify",
        "flush     unix  n       -       n       1000?   0       flush",
        "proxymap  unix  -       -       n       -       -       proxymap",
        "proxywrite unix -       -       n       -       1       proxymap",
        "showq     unix  n       -       n       -       -       showq",
        "error     unix  -       -       n       -       -       error",
        "retry     unix  -       -       n       -       -       error",
        "discard   unix  -       -       n       -       -       discard",
        "lmtp      unix  -       -       n       -       -       lmtp",
        "anvil     unix  -       -       n       -       1       anvil",
        "scache    unix  -       -       n       -       1       scache",
        "postlog   unix-dgram n  -       n       -       1       postlogd",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# start / stop

_SERVER_NAMES = ("dovecot", "/usr/sbin/dovecot", "/usr/lib/postfix/", "master", "qmgr",
                 "pickup", "smtpd", "smtp", "lmtp", "tlsmgr", "cleanup", "trivial-rewrite",
                 "bounce", "verify", "flush", "proxymap", "showq", "error", "discard",
                 "anvil", "scache", "postlogd", "postfix")


def _instance_pids(state):
    """Live processes of this instance, as {pid: starttime}: the two masters named by the
    pid files and their descendants, plus strays (e.g. reparented after a crashed master)
    that look like Dovecot/Postfix and whose cwd is inside DIR or the Dovecot base_dir
    (both masters and all their children chdir there, or into a mail home under DIR)."""
    p = _paths(state["dir"])
    queue = state.get("postfix_queue") or p["postfix_queue"]
    dirs = [os.path.realpath(state["dir"]), os.path.realpath(state["base_dir"]),
            os.path.realpath(queue)]

    def cwd_inside(pid):
        try:
            cwd = os.readlink("/proc/%d/cwd" % pid)
        except OSError:
            return False
        return any(cwd == d or cwd.startswith(d + os.sep) or cwd.startswith(d + " (deleted)")
                   for d in dirs)

    roots = []
    for pid_file in (os.path.join(state["base_dir"], "master.pid"),
                     os.path.join(queue, "pid", "master.pid")):
        pid = _read_pid(pid_file)
        if pid and cwd_inside(pid):  # not a reused pid
            roots.append(pid)
    mine = _descendants(roots)
    for d in dirs:
        for pid, start in _pids_under_dir(d).items():
            if pid not in mine and _cmdline(pid).startswith(_SERVER_NAMES):
                mine[pid] = start
    return mine


def start(dir, introspect_url, domain="example.test", smtp_port=None, imap_port=None,
          lmtp_port=None, auth_port=None, tls=None, smtp_starttls_port=None,
          smtps_port=None, imaps_port=None, auth_failure_delay="0", message_size_limit=10240000,
          timeout=60.0):
    """Write configs under `dir`, start Dovecot and Postfix, wait until they serve.
    Returns the info dict (also printed by the CLI and saved as DIR/state.json)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    if os.geteuid() != 0:
        raise HarnessError("must run as root (Postfix's master and Dovecot need it)")
    for tool in ("dovecot", "doveadm", "postfix", "postconf"):
        if not _which(tool):
            raise HarnessError("%s not found; run tests/interop/install.sh" % tool)
    dv = dovecot_version()
    m = re.match(r"(\d+)\.(\d+)", dv)
    if not m or (int(m.group(1)), int(m.group(2))) != (2, 3):
        raise HarnessError("Dovecot %s: only the 2.3 config syntax is implemented "
                           "(Debian 12); 2.4 renamed most settings" % dv)
    pv = postfix_version()
    url = _normalize_introspect_url(introspect_url)

    os.makedirs(dir, exist_ok=True)
    p = _paths(dir)
    old = _load_state(p["dir"])
    if old and _instance_pids(old):
        raise HarnessError("an instance is already running in %s; stop it first" % p["dir"])
    if old and old.get("short_root", "") and \
            os.path.basename(old["short_root"]).startswith("mfdrelay-"):
        shutil.rmtree(old["short_root"], ignore_errors=True)  # left by a crashed run
    os.chmod(p["dir"], 0o755)
    _check_traversable(p["dir"], "mail")
    _check_traversable(p["dir"], "postfix")

    if tls is None:
        tls = _which("openssl") is not None
    fixed = {"smtp": smtp_port, "imap": imap_port, "lmtp": lmtp_port, "auth": auth_port}
    if tls:
        fixed.update({"smtp_starttls": smtp_starttls_port, "smtps": smtps_port,
                      "imaps": imaps_port})
    auto = [k for k, v in fixed.items() if not v]

    attempts = 3 if auto else 1
    for attempt in range(1, attempts + 1):
        try:
            with _PortLock(deadline):
                chosen = _free_ports(len(auto), avoid=[v for v in fixed.values() if v])
                ports = dict(fixed)
                ports.update(zip(auto, chosen))
                info = _start_once(p, url, domain, ports, tls, auth_failure_delay,
                                   message_size_limit, deadline, dv, pv)
        except HarnessError as e:
            busy = "Address already in use" in str(e) or "shared with another" in str(e)
            fixed_named = any(re.search(r"\b%d\b" % v, str(e)) for v in fixed.values() if v)
            if busy and not fixed_named and attempt < attempts and \
                    time.monotonic() < deadline:
                _log("port collision, retrying with other ports (attempt %d)" % attempt)
                continue
            raise
        info["start_seconds"] = round(time.monotonic() - t0, 3)
        _save_state(p["dir"], info)
        return info


def _start_once(p, url, domain, ports, tls, auth_failure_delay, message_size_limit,
                deadline, dv, pv):
    # fresh per-run directories (mail is kept only until the next start)
    for key in ("postfix_queue", "postfix_data", "dovecot_state", "mail", "home", "tls",
                "postfix_conf"):
        if os.path.islink(p[key]):
            os.unlink(p[key])
        shutil.rmtree(p[key], ignore_errors=True)
    for key in ("dovecot_log", "postfix_log", "harness_log"):
        try:
            os.unlink(p[key])
        except FileNotFoundError:
            pass

    # Unix sockets have a 108-byte path limit (sun_path): Dovecot's live in base_dir,
    # Postfix's in the queue directory (e.g. QUEUE/public/postlog, and Postfix fails
    # *silently* when that is too long). With a long DIR, both go to a short directory
    # /tmp/mfdrelay-XXXXXXXX (symlinked from DIR, removed by stop).
    short_root = None
    base_dir = os.path.join(p["dir"], "run")
    shutil.rmtree(base_dir, ignore_errors=True)
    try:
        os.unlink(base_dir)
    except OSError:
        pass
    if len(p["dir"]) > 48:
        short_root = tempfile.mkdtemp(prefix="mfdrelay-", dir="/tmp")
        os.chmod(short_root, 0o755)
        base_dir = os.path.join(short_root, "run")
        p = dict(p, postfix_queue=os.path.join(short_root, "pq"))
        for link, target in ((os.path.join(p["dir"], "run"), base_dir),
                             (os.path.join(p["dir"], "postfix-queue"), p["postfix_queue"])):
            os.symlink(target, link)

    mail_pw = pwd.getpwnam("mail")
    for key in ("mail", "home"):
        os.makedirs(p[key])
        os.chown(p[key], mail_pw.pw_uid, mail_pw.pw_gid)
        os.chmod(p[key], 0o755)
    os.makedirs(p["dovecot_state"])
    os.makedirs(p["postfix_conf"])
    os.makedirs(p["postfix_queue"])
    os.makedirs(p["postfix_data"])
    pf_pw = pwd.getpwnam("postfix")
    os.chown(p["postfix_data"], pf_pw.pw_uid, pf_pw.pw_gid)

    tls_files = _make_tls(p["tls"], domain, p["harness_log"]) if tls else None
    if tls and not tls_files:
        tls = False
    if not tls:
        for k in ("smtp_starttls", "smtps", "imaps"):
            ports.pop(k, None)

    with open(p["dovecot_conf"], "w") as f:
        f.write(_dovecot_conf(p, base_dir, ports, domain, tls_files, auth_failure_delay))
    with open(p["oauth2_conf"], "w") as f:
        f.write(_oauth2_conf(url))
    with open(os.path.join(p["postfix_conf"], "main.cf"), "w") as f:
        f.write(_postfix_main_cf(p, ports, domain, tls_files, message_size_limit))
    with open(os.path.join(p["postfix_conf"], "master.cf"), "w") as f:
        f.write(_postfix_master_cf(ports, tls_files))
    # Postfix refuses to read a main.cf/master.cf changed less than ~2 s ago (it sleeps
    # and re-reads, in case an editor is still writing it): date the files back.
    past = time.time() - 60
    for name in ("main.cf", "master.cf"):
        os.utime(os.path.join(p["postfix_conf"], name), (past, past))

    info = {
        "dir": p["dir"],
        "domain": domain,
        "introspect_url": url,
        "smtp_port": ports["smtp"],
        "imap_port": ports["imap"],
        "lmtp_port": ports["lmtp"],
        "auth_port": ports["auth"],
        "smtp_starttls_port": ports.get("smtp_starttls"),
        "smtps_port": ports.get("smtps"),
        "imaps_port": ports.get("imaps"),
        "ca_cert": tls_files["ca_cert"] if tls_files else None,
        "tls": bool(tls_files),
        "maildir_root": p["mail"],
        "base_dir": base_dir,
        "postfix_queue": p["postfix_queue"],
        "short_root": short_root,
        "dovecot_conf": p["dovecot_conf"],
        "postfix_config_dir": p["postfix_conf"],
        "dovecot_log": p["dovecot_log"],
        "postfix_log": p["postfix_log"],
        "dovecot_version": dv,
        "postfix_version": pv,
        "pid_dovecot": None,
        "pid_postfix": None,
    }
    # saved early so that `stop` can clean up after a half-failed start
    _save_state(p["dir"], info)

    try:
        # --- Dovecot (daemonizes itself)
        rc, out = _run([_which("dovecot"), "-c", p["dovecot_conf"]],
                       timeout=max(1, deadline - time.monotonic()), log_path=p["harness_log"])
        if rc != 0:
            raise HarnessError("dovecot failed to start (rc=%d): %s\n--- dovecot.log:\n%s"
                               % (rc, out, _tail(p["dovecot_log"])))
        # --- Postfix (separate instance: own config_directory, queue, data, log)
        env = dict(os.environ, MAIL_CONFIG=p["postfix_conf"])
        rc, out = _run([_which("postfix"), "-c", p["postfix_conf"], "start"],
                       timeout=max(1, deadline - time.monotonic()), env=env,
                       log_path=p["harness_log"])
        if rc != 0:
            raise HarnessError("postfix failed to start (rc=%d): %s\n--- postfix.log:\n%s\n"
                               "(Postfix fails silently when maillog_file is not under "
                               "maillog_file_prefixes or a socket path under the queue "
                               "directory exceeds 107 bytes)"
                               % (rc, out, _tail(p["postfix_log"])))
        # --- wait until everything serves
        _wait_banner(ports["imap"], b"* OK", deadline)
        _wait_banner(ports["lmtp"], b"220", deadline)
        _wait_banner(ports["auth"], b"VERSION", deadline)
        _wait_banner(ports["smtp"], b"220", deadline)
        if tls_files:
            _wait_banner(ports["smtp_starttls"], b"220", deadline)
            _wait_banner(ports["smtps"], b"220", deadline, tls_files["ca_cert"])
            _wait_banner(ports["imaps"], b"* OK", deadline, tls_files["ca_cert"])
        for name, port in sorted(ports.items()):
            if _listen_count(port) != 1:
                raise HarnessError("%s port %d is shared with another listener (another "
                                   "Postfix? SO_REUSEPORT)" % (name, port))
        info["pid_dovecot"] = _read_pid(os.path.join(base_dir, "master.pid"))
        info["pid_postfix"] = _read_pid(os.path.join(p["postfix_queue"], "pid",
                                                      "master.pid"))
        if not info["pid_dovecot"] or not info["pid_postfix"]:
            raise HarnessError("master pid files missing")
    except Exception as e:
        msg = str(e)
        for log in (p["dovecot_log"], p["postfix_log"]):
            if "Address already in use" in _tail(log, 200):
                msg += "\n(Address already in use, see %s)" % log
        try:
            stop(p["dir"], timeout=20)
        except Exception as e2:  # report the original error
            msg += "\n(cleanup after failed start also failed: %s)" % e2
        raise HarnessError(msg)
    return info


def stop(dir, timeout=30.0):
    """Stop both servers of the instance in `dir`; returns a report dict.
    Raises HarnessError if processes remain after SIGKILL."""
    t0 = time.monotonic()
    p = _paths(dir)
    state = _load_state(p["dir"])
    if not state:
        return {"stopped": True, "note": "no state file", "remaining": []}
    before = _instance_pids(state)
    report = {"stopped": True, "killed": [], "remaining": [], "dovecot_stop": None,
              "postfix_stop": None}
    # Dovecot: SIGTERM to the master, which is all `doveadm -c CONF stop` does, but
    # doveadm polls coarsely (~2.2 s); we poll the processes ourselves (~1.1 s).
    dpid = _read_pid(os.path.join(state["base_dir"], "master.pid"))
    if dpid and dpid in before:
        try:
            os.kill(dpid, signal.SIGTERM)
            report["dovecot_stop"] = "SIGTERM %d" % dpid
        except ProcessLookupError:
            pass
    elif dpid and os.path.exists(state["dovecot_conf"]):
        rc, out = _run([_which("doveadm") or "doveadm", "-c", state["dovecot_conf"], "stop"],
                       timeout=timeout, log_path=p["harness_log"])
        report["dovecot_stop"] = "doveadm stop rc=%d" % rc
    queue = state.get("postfix_queue") or p["postfix_queue"]
    ppid = _read_pid(os.path.join(queue, "pid", "master.pid"))
    if ppid and ppid in before and os.path.exists(
            os.path.join(state["postfix_config_dir"], "main.cf")):
        env = dict(os.environ, MAIL_CONFIG=state["postfix_config_dir"])
        rc, out = _run([_which("postfix") or "postfix", "-c", state["postfix_config_dir"],
                        "stop"], timeout=timeout, env=env, log_path=p["harness_log"])
        report["postfix_stop"] = "postfix stop rc=%d" % rc

    deadline = t0 + timeout
    remaining = _alive(before)
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = _alive(before)
    # anything started after `before` was taken (e.g. a fresh imap process)
    remaining.update(_instance_pids(state))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not remaining:
            break
        for pid in remaining:
            report["killed"].append("%d %s (%s)" % (pid, _cmdline(pid), sig.name))
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 5
        while time.monotonic() < end:
            remaining = _alive(remaining)
            if not remaining:
                break
            time.sleep(0.05)
    remaining = _alive(remaining)
    report["remaining"] = ["%d %s" % (pid, _cmdline(pid)) for pid in remaining]
    report["stopped"] = not remaining
    short = state.get("short_root")
    if short and os.path.basename(short).startswith("mfdrelay-") and not remaining:
        shutil.rmtree(short, ignore_errors=True)
    report["stop_seconds"] = round(time.monotonic() - t0, 3)
    if remaining:
        raise HarnessError("processes remain after stop: %s" % report["remaining"])
    return report


def maildir(dir, user):
    """Delivered message files (absolute paths) of `user`, oldest first, INBOX only."""
    root = os.path.join(_paths(dir)["mail"], user.lower())  # Dovecot's %Lu
    files = []
    for sub in ("new", "cur"):
        d = os.path.join(root, sub)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        files.extend(os.path.join(d, n) for n in names)
    files.sort(key=lambda f: (os.path.getmtime(f) if os.path.exists(f) else 0, f))
    return files


def status(dir):
    state = _load_state(dir)
    if not state:
        return {"running": False, "processes": []}
    pids = _instance_pids(state)
    return {"running": bool(pids),
            "processes": ["%d %s" % (pid, _cmdline(pid)) for pid in sorted(pids)]}


# ----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="write configs, start Dovecot + Postfix, print JSON")
    s.add_argument("--dir", required=True)
    s.add_argument("--introspect-url", required=True,
                   help="e.g. http://127.0.0.1:8080/introspect (?token= is appended)")
    s.add_argument("--domain", default="example.test")
    for name in ("smtp", "imap", "lmtp", "auth", "smtp-starttls", "smtps", "imaps"):
        s.add_argument("--%s-port" % name, type=int, default=None)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--tls", dest="tls", action="store_true", default=None,
                   help="also STARTTLS/SMTPS/IMAPS ports (default: if openssl exists)")
    g.add_argument("--no-tls", dest="tls", action="store_false")
    s.add_argument("--auth-failure-delay", default="0",
                   help="Dovecot auth_failure_delay in seconds (Dovecot default 2)")
    s.add_argument("--message-size-limit", type=int, default=10240000)
    s.add_argument("--timeout", type=float, default=60.0)
    t = sub.add_parser("stop", help="stop both servers, leave no process behind")
    t.add_argument("--dir", required=True)
    t.add_argument("--timeout", type=float, default=30.0)
    m = sub.add_parser("maildir", help="list delivered message files of a user")
    m.add_argument("--dir", required=True)
    m.add_argument("--user", required=True)
    st = sub.add_parser("status", help="show live processes of the instance")
    st.add_argument("--dir", required=True)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "start":
            delay = a.auth_failure_delay
            if re.fullmatch(r"\d+(\.\d+)?", delay):
                delay = "%d msecs" % round(float(delay) * 1000)
            info = start(a.dir, a.introspect_url, a.domain, a.smtp_port, a.imap_port,
                         a.lmtp_port, a.auth_port, a.tls, a.smtp_starttls_port, a.smtps_port,
                         a.imaps_port, delay, a.message_size_limit, a.timeout)
            print(json.dumps(info, sort_keys=True), flush=True)
        elif a.cmd == "stop":
            print(json.dumps(stop(a.dir, a.timeout), sort_keys=True), flush=True)
        elif a.cmd == "maildir":
            print(json.dumps(maildir(a.dir, a.user)), flush=True)
        elif a.cmd == "status":
            print(json.dumps(status(a.dir), sort_keys=True), flush=True)
    except HarnessError as e:
        _log("error: %s" % e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
