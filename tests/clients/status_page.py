#!/usr/bin/env python3
"""Drives the relay's status page in headless Chromium with real clicks (tests/it/status_page.rs).

Each action of the page, in order: a token for an app-only identity, a device-code sign-in
(followed while the page refreshes), queue retry / drop (with its confirmation, cancelled
once) / retry all, a test mail, then an authorization-code sign-in (it leaves the page for
the provider and comes back to /status), and last the page with scripting off (read-only,
the commands shown). A screenshot of each state goes to --out.

Talks to the Rust test on stdout/stdin, one line each:
  SCREENSHOT <path>      a screenshot was written
  USER_CODE <code>       the code the page shows; the test approves it, then sends "go"
  WAIT <what>            the test prepares <what> (e.g. the upstream back up), then sends "go"
  OK                     everything passed (exit 0); else "FAIL <why>" and exit 1

Chromium and chromedriver are Debian's (/usr/bin/chromedriver: selenium-manager never runs
and nothing is downloaded); every wait is bounded.
"""

import argparse
import base64
import json
import os
import sys
import tempfile
import time

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

WAIT = 20


def qid(n):
    """A queue id as the page shows it (16 hex digits)."""
    return n if isinstance(n, str) else "%016X" % n


def say(*words):
    print(*words, flush=True)


def go():
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise AssertionError(f"the test said {line!r}, not go")


class Page:
    def __init__(self, args):
        self.args = args
        self.shots = 0
        opts = webdriver.ChromeOptions()
        for a in (
            "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
            "--disable-background-networking --disable-component-update --disable-sync "
            "--disable-dev-shm-usage --window-size=1500,1100"
        ).split():
            opts.add_argument(a)
        opts.add_argument("--user-data-dir=" + tempfile.mkdtemp(prefix="mfd-relay-chromium-"))
        opts.binary_location = args.chromium
        service = Service(executable_path=args.chromedriver)
        self.d = webdriver.Chrome(service=service, options=opts)
        self.d.set_page_load_timeout(WAIT)
        self.d.set_script_timeout(WAIT)
        if args.user:
            # The browser remembers the admin's basic-auth password for the listener, as after
            # its login dialog; every request of the page (fetch included) sends it.
            token = base64.b64encode(f"{args.user}:{args.password}".encode()).decode()
            self.d.execute_cdp_cmd("Network.enable", {})
            self.d.execute_cdp_cmd(
                "Network.setExtraHTTPHeaders", {"headers": {"Authorization": "Basic " + token}}
            )

    def shot(self, name, show=None):
        """A screenshot, with the element `show` (CSS) scrolled into the middle of the view."""
        if show:
            for el in self.many(show)[:1]:
                self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        self.shots += 1
        path = os.path.join(self.args.out, f"{self.shots:02d}-{name}.png")
        self.d.save_screenshot(path)
        say("SCREENSHOT", path)

    def wait(self, what, cond, timeout=WAIT):
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.1).until(lambda d: cond())
        except TimeoutException:
            raise AssertionError(f"timed out ({timeout} s) waiting for {what}") from None

    def one(self, css):
        return self.d.find_element(By.CSS_SELECTOR, css)

    def many(self, css):
        return self.d.find_elements(By.CSS_SELECTOR, css)

    def click(self, css):
        el = self.wait(f"a visible {css}", lambda: next((e for e in self.many(css) if e.is_displayed()), None))
        el.click()
        return el

    def card(self, text, timeout=WAIT):
        """The action card (in #actions) whose text contains `text`."""

        def find():
            for c in self.many("#actions .card"):
                if text in c.text:
                    return c
            return None

        return self.wait(f"a card saying {text!r} (cards: {[c.text for c in self.many('#actions .card')]})", find, timeout)

    def api(self, path):
        """GET on the listener from inside the page (its credentials, its origin)."""
        return self.d.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {cache: 'no-store'}).then(r => r.json()).then(done, e => done({error: String(e)}));",
            path,
        )

    def queue(self):
        """The queued records: a list, or a page of them (the first list in an object)."""
        q = self.api("/api/queue")
        if isinstance(q, dict):
            if "error" in q and len(q) == 1:
                raise AssertionError(q["error"])
            q = next((v for v in q.values() if isinstance(v, list)), [])
        return q

    def queue_ids(self):
        return [qid(m["id"]) for m in self.queue()]


def run(p, args):
    d = p.d
    base = args.base
    d.get(base + "/status")
    assert "mfd-relay status" in d.title, d.title
    # The script is running (the page's CSP allows it by its hash): buttons are shown.
    p.wait("the script's buttons", lambda: p.one("button[data-act=token][data-id=scans]").is_displayed())
    assert p.one("#refresh").text.startswith("refreshed every"), p.one("#refresh").text
    # With scripting on, the <noscript> meta refresh is inert: no reload can cut an action short.
    assert d.execute_script("return document.querySelector('meta[http-equiv=refresh]')") is None
    p.shot("status-page")

    # --- an app-only identity: a token now ------------------------------------------------
    p.click("button[data-act=token][data-id=scans]")
    p.card(f"The provider issued a token for {args.app_account}.")
    p.shot("token-fetched")

    # --- device code: the code on the page, followed through refreshes --------------------
    p.click("button[data-act=signin][data-id=desk]")
    code = p.wait("the user code", lambda: p.one("#user-code-desk").text.strip() if p.many("#user-code-desk") else None)
    link = p.one("#actions .card a")
    assert link.get_attribute("href").endswith("/devicelogin"), link.get_attribute("href")
    # A refresh replaces the data part but not the sign-in being followed.
    d.execute_script("document.querySelector('#data table').dataset.old = '1';")
    p.click("button[data-act=refresh]")
    p.wait("the data part replaced", lambda: not p.many("#data table[data-old]"))
    assert p.one("#user-code-desk").text.strip() == code, "the code is still shown after a refresh"
    p.shot("device-code-shown")
    say("USER_CODE", code)
    go()
    p.card(f"Signed in as {args.device_account}.")
    p.wait(
        "the identity row with the signed-in account",
        lambda: args.device_account in p.one("#identity-desk").text and "ready" in p.one("#identity-desk").text,
    )
    row = p.one("#identity-desk").text
    assert args.device_mailbox in row, row
    p.shot("device-code-signed-in", "#identities")

    # --- queue: retry one, drop one (cancel once), retry all --------------------------------
    ids = args.queued.split(",")
    assert sorted(p.queue_ids()) == sorted(ids), p.queue_ids()
    first, second, third = ids
    rows = p.many("tr[data-msg]")
    assert len(rows) == 3, [r.text for r in rows]
    attempts = {qid(m["id"]): m["attempts"] for m in p.queue()}
    p.click(f"button[data-act=retry][data-id='{first}']")
    p.card(f"Message {first} is due now")
    p.wait(
        "the retried message attempted again",
        lambda: {qid(m["id"]): m["attempts"] for m in p.queue()}.get(first, 0) > attempts[first],
    )
    p.shot("queue-retried", "#queue-table")

    p.click(f"button[data-act=drop][data-id='{second}']")
    p.wait("the confirmation", lambda: p.many(f"tr[data-msg='{second}'] .confirm"))
    # While the confirmation is open, a refresh waits instead of taking it away.
    p.click("button[data-act=refresh]")
    time.sleep(0.5)
    assert p.many(f"tr[data-msg='{second}'] .confirm"), "the confirmation survived a refresh"
    assert "waits" in p.one("#refresh").text, p.one("#refresh").text
    p.shot("drop-confirmation", ".confirm")
    p.click(f"tr[data-msg='{second}'] button[data-act=drop-no]")
    p.wait("the Drop button back", lambda: p.many(f"button[data-act=drop][data-id='{second}']"))
    assert second in p.queue_ids(), "Cancel dropped nothing"
    p.click(f"button[data-act=drop][data-id='{second}']")
    p.click(f"tr[data-msg='{second}'] button[data-act=drop-yes]")
    p.card(f"Message {second} was dropped")
    p.wait("the dropped row gone", lambda: not p.many(f"tr[data-msg='{second}']"))
    assert second not in p.queue_ids()
    p.shot("queue-dropped", "#queue-table")

    say("WAIT", "retry-all")
    go()
    p.click("button[data-act=retry-all]")
    p.card("2 message(s) made due now.")
    p.wait("the queue to drain", lambda: p.queue_ids() == [])
    p.click("button[data-act=refresh]")
    p.wait("the empty queue on the page", lambda: "Nothing waits" in p.one("#data").text)
    p.shot("queue-empty", "#queue")

    # --- test mail: each step as it arrives ------------------------------------------------
    field = p.one("input[data-device=floor3]")
    field.send_keys(args.test_to)
    # What is typed survives a refresh.
    p.click("button[data-act=refresh]")
    time.sleep(0.5)
    assert p.one("input[data-device=floor3]").get_attribute("value") == args.test_to
    title = f"Test mail from floor3 to {args.test_to}"
    if args.test_mail == "delivered":
        # The provider holds its answer to the message back for a while: the steps before it
        # are on the page while the relay still waits, not all at once at the end.
        say("WAIT", "slow-final")
        go()
        p.click("button[data-act=test][data-device=floor3]")
        c = p.card(title)
        p.wait("the first steps", lambda: len(c.find_elements(By.CSS_SELECTOR, "ol li")) >= 3)
        early = c.text
        assert "Delivered" not in early and "final" not in early, early
        p.shot("test-mail-in-progress", "#actions")
        c = p.card("Delivered")
        assert title in c.text, c.text
        steps = c.find_elements(By.CSS_SELECTOR, "ol li")
        assert len(steps) >= 2, c.text
        assert all(s.text.startswith("✓") for s in steps), c.text
        assert "final" in c.text, c.text
        # A recipient the device may not send to: the relay's own reason (400, JSON), nothing sent.
        p.one("input[data-device=restricted]").send_keys("someone@elsewhere.test")
        p.click("button[data-act=test][data-device=restricted]")
        refused = p.card("Test mail from restricted to someone@elsewhere.test")
        p.wait("the refusal", lambda: "Test failed: " in refused.text)
        assert "(HTTP 400)" not in refused.text, "the JSON error is shown as text: " + refused.text
        assert not refused.find_elements(By.CSS_SELECTOR, "ol li"), refused.text
    else:
        p.click("button[data-act=test][data-device=floor3]")
        c = p.card("no test-mail API")
        assert title in c.text, c.text
    p.shot("test-mail", "#actions")

    # --- auth code: to the provider and back to /status with the result ------------------
    p.click("button[data-act=signin][data-id=web]")
    p.wait("the return to /status", lambda: "/status?signin=web" in d.current_url)
    result = p.wait("the sign-in result", lambda: p.many("#signin-result") and p.one("#signin-result"))
    assert f'Identity "web" signed in as {args.web_account}' in result.text, result.text
    assert "Signed in" in result.text, result.text
    p.wait("the web identity ready", lambda: "ready" in p.one("#identity-web").text)
    p.shot("auth-code-signed-in")

    # --- without JavaScript: read-only, the commands shown, the meta refresh on ---------------
    d.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    d.get(base + "/status")
    assert not [b for b in p.many("button") if b.is_displayed()], "no buttons without JavaScript"
    assert "mfd-relay auth login desk" in p.one("#identities").text, p.one("#identities").text
    assert "mfd-relay test --device floor3 --to <address>" in p.one("#devices").text, p.one("#devices").text
    assert p.many("meta[http-equiv=refresh]"), "the page reloads itself without JavaScript"
    p.shot("without-javascript")
    d.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})

    # Nothing went wrong in the page itself (CSP refusals, script errors).
    logs = [e for e in d.get_log("browser") if e.get("level") == "SEVERE"]
    # The refusals this run provoked on purpose (a recipient the device may not send to: 400;
    # a relay without a test-mail API: 404), which the browser logs as failed loads.
    expected = "400" if args.test_mail == "delivered" else "404"
    logs = [
        e
        for e in logs
        if not (e.get("source") == "network" and "/api/test" in e.get("message", "") and f"status of {expected}" in e.get("message", ""))
    ]
    assert not logs, logs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="http://localhost:PORT")
    ap.add_argument("--out", required=True)
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--queued", required=True, help="three queue ids, comma-separated")
    ap.add_argument("--app-account", required=True)
    ap.add_argument("--device-account", required=True)
    ap.add_argument("--device-mailbox", required=True)
    ap.add_argument("--web-account", required=True)
    ap.add_argument("--test-to", required=True)
    ap.add_argument("--test-mail", choices=["delivered", "missing"], required=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    p = Page(args)
    try:
        run(p, args)
        say("OK")
        return 0
    except Exception as e:  # noqa: BLE001 - the test shows whatever went wrong
        try:
            p.shot("failure")
            say("PAGE", json.dumps(p.d.find_element(By.TAG_NAME, "body").text))
        except Exception:  # noqa: BLE001
            pass
        say("FAIL", f"{type(e).__name__}: {e}")
        return 1
    finally:
        p.d.quit()


if __name__ == "__main__":
    sys.exit(main())
