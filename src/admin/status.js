// The status page's actions (src/admin/status.rs): sign-ins, token requests, queue retry
// and drop, test mails, and the refresh of the data part. Inline in the page and allowed
// by its hash (Content-Security-Policy), so no other script runs there. Every text from
// the relay or the provider goes in with textContent, never as HTML; every change is a
// same-origin JSON POST, which the admin listener's guard accepts (src/admin/guard.rs).
"use strict";
(function () {
  var REFRESH_MS = 30000;
  var POLL_MS = 2000;
  var MAX_CARDS = 8;
  var actions = document.getElementById("actions");
  // Holds on the data part: open confirmations and row actions in flight. While one is
  // held (or a field in it has the focus) the refresh waits, so it cannot undo them.
  var holds = 0;
  var refreshWanted = false;

  function el(tag, attrs, text) {
    var n = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { n.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) n.textContent = String(text);
    return n;
  }

  function reveal(root) {
    root.querySelectorAll("[data-js]").forEach(function (n) { n.hidden = false; });
  }

  // A box in #actions (outside the refreshed part) that reports one action.
  function card(title) {
    var box = el("div", { "class": "card" });
    var h = el("h3");
    h.appendChild(el("span", {}, title));
    var close = el("button", { type: "button", "data-act": "close", "aria-label": "Close" }, "×");
    h.appendChild(close);
    box.appendChild(h);
    var body = el("div", { "class": "body" });
    box.appendChild(body);
    actions.insertBefore(box, actions.firstChild);
    var all = actions.querySelectorAll(".card");
    for (var i = all.length - 1; i >= MAX_CARDS; i--) {
      if (all[i].dataset.running !== "1") all[i].remove();
    }
    var c = {
      box: box,
      body: body,
      line: function (text, cls) {
        var p = el("p", cls ? { "class": cls } : {}, text);
        body.appendChild(p);
        return p;
      },
      ok: function (text) { box.classList.add("ok"); box.classList.remove("bad"); return c.line(text); },
      fail: function (text) { box.classList.add("bad"); box.classList.remove("ok"); return c.line(text, "err"); },
      running: function (on) { box.dataset.running = on ? "1" : ""; },
    };
    return c;
  }

  function errorText(status, text) {
    try {
      var j = JSON.parse(text);
      if (j && typeof j.error === "string") return j.error;
      if (j && typeof j.message === "string") return j.message;
    } catch (e) { /* not JSON: the text itself */ }
    text = (text || "").trim();
    return text ? text + " (HTTP " + status + ")" : "HTTP " + status;
  }

  function post(path, body) {
    return fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
      credentials: "same-origin",
      cache: "no-store",
    });
  }

  // The JSON answer of a request, or an Error with the relay's own text.
  function answer(resp) {
    return resp.text().then(function (text) {
      if (!resp.ok) throw new Error(errorText(resp.status, text));
      return JSON.parse(text);
    });
  }

  function enc(s) { return encodeURIComponent(s); }
  function sleep(ms) { return new Promise(function (r) { setTimeout(r, ms); }); }
  function webUrl(u) { return typeof u === "string" && /^https?:\/\//i.test(u); }

  // --- refresh: only #data is replaced, from a fresh copy of this page -----------------
  function editing() {
    var a = document.activeElement;
    return !!(a && a.closest && a.closest("#data") && a.tagName === "INPUT");
  }

  function refresh() {
    if (holds > 0 || editing()) { refreshWanted = true; return Promise.resolve(); }
    refreshWanted = false;
    var status = document.getElementById("refresh");
    return fetch(location.pathname, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      })
      .then(function (html) {
        if (holds > 0 || editing()) { refreshWanted = true; return; }
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("data");
        var data = document.getElementById("data");
        if (!fresh || !data) throw new Error("no data in the page");
        // What was typed in the test-mail fields survives the refresh.
        var typed = {};
        data.querySelectorAll("input[data-device]").forEach(function (i) { typed[i.dataset.device] = i.value; });
        var nodes = Array.prototype.map.call(fresh.childNodes, function (n) { return document.importNode(n, true); });
        data.replaceChildren.apply(data, nodes);
        data.querySelectorAll("input[data-device]").forEach(function (i) {
          if (typed[i.dataset.device]) i.value = typed[i.dataset.device];
        });
        reveal(data);
        var upd = doc.getElementById("updated");
        if (upd) document.getElementById("updated").textContent = upd.textContent;
        status.textContent = "refreshed every " + REFRESH_MS / 1000 + " s";
        status.classList.remove("err");
      })
      .catch(function (e) {
        status.textContent = "refresh failed (" + e.message + "); retrying";
        status.classList.add("err");
      });
  }

  function release() {
    holds = Math.max(0, holds - 1);
    if (refreshWanted) refresh();
  }

  // --- sign-in and token requests ---------------------------------------------------------
  function signIn(id, mailbox) {
    var c = card("Sign-in of " + id);
    c.running(true);
    c.line("Starting the sign-in…");
    return post("/api/auth/login/" + enc(id))
      .then(answer)
      .then(function (a) {
        c.body.replaceChildren();
        if (a.flow === "device_code") return followDeviceCode(c, id, mailbox, a);
        if (a.flow === "auth_code") {
          if (!webUrl(a.url)) throw new Error("the provider's address is not a web address");
          var back = "";
          try { back = new URL(a.redirect_uri).origin; } catch (e) { /* shown as is below */ }
          if (back && back !== location.origin) {
            c.line("Going to the provider; after signing in as " + mailbox + " the browser comes back to " +
              back + "/status (the relay's redirect URI), which may ask for the admin password again.");
          } else {
            c.line("Going to the provider; after signing in as " + mailbox + " you come back to this page.");
          }
          location.assign(a.url);
          return;
        }
        if (a.flow === "done") {
          c.ok("Token issued for " + a.account + ".");
          return refresh();
        }
        throw new Error("unexpected answer from the relay");
      })
      .catch(function (e) { c.fail("Sign-in failed: " + e.message); })
      .then(function () { c.running(false); });
  }

  function followDeviceCode(c, id, mailbox, a) {
    var p = c.line("On any computer or phone, open ");
    if (webUrl(a.verification_uri)) {
      p.appendChild(el("a", { href: a.verification_uri, target: "_blank", rel: "noopener noreferrer" }, a.verification_uri));
    } else {
      p.appendChild(el("code", {}, a.verification_uri));
    }
    p.appendChild(document.createTextNode(", enter the code "));
    p.appendChild(el("code", { "class": "usercode", id: "user-code-" + id }, a.user_code));
    p.appendChild(document.createTextNode(" and sign in as " + mailbox + "."));
    var wait = c.line("");
    var deadline = Date.now() + (Number(a.expires_in) || 900) * 1000;
    function left() {
      var s = Math.max(0, Math.round((deadline - Date.now()) / 1000));
      return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
    }
    function poll() {
      wait.textContent = "Waiting for the sign-in… (the code is good for " + left() + ")";
      // The relay's own poll ends at the code's expiry; a little later the page gives up too.
      if (Date.now() > deadline + 15000) {
        wait.remove();
        c.fail("The code expired before anyone signed in. Start the sign-in again.");
        return;
      }
      return sleep(POLL_MS)
        .then(function () { return fetch("/api/auth/login/" + enc(id), { credentials: "same-origin", cache: "no-store" }); })
        .then(answer)
        .then(function (st) {
          if (st.state === "pending") return poll();
          wait.remove();
          if (st.state === "done") {
            c.ok("Signed in as " + st.account + ".");
            return refresh();
          }
          if (st.state === "failed") return void c.fail("Sign-in failed: " + st.error);
          c.fail("The relay has no sign-in of this identity in progress (restarted?). Start again.");
        }, function (e) {
          // The relay may be restarting, or a request was lost: keep following.
          wait.textContent = "Cannot ask the relay (" + e.message + "); still trying…";
          return poll();
        });
    }
    return poll();
  }

  function fetchToken(id) {
    var c = card("Token for " + id);
    c.running(true);
    c.line("Asking the provider for a token…");
    return post("/api/auth/login/" + enc(id))
      .then(answer)
      .then(function (a) {
        c.body.replaceChildren();
        if (a.flow !== "done") throw new Error("unexpected answer from the relay");
        c.ok("The provider issued a token for " + a.account + ".");
        return refresh();
      })
      .catch(function (e) { c.body.replaceChildren(); c.fail("No token: " + e.message); })
      .then(function () { c.running(false); });
  }

  // --- queue ---------------------------------------------------------------------------
  function queueAction(path, title, done, button) {
    var c = card(title);
    holds++;
    if (button) button.disabled = true;
    return post(path)
      .then(answer)
      .then(function (a) { c.ok(done(a)); })
      .catch(function (e) { c.fail(e.message); })
      .then(function () { release(); return refresh(); });
  }

  function confirmDrop(button) {
    var id = button.dataset.id;
    var cell = button.parentNode;
    var saved = Array.prototype.slice.call(cell.childNodes);
    holds++;
    var box = el("span", { "class": "confirm" });
    box.appendChild(el("span", { "class": "err" }, "Drop without delivering? "));
    var yes = el("button", { type: "button", "class": "danger", "data-act": "drop-yes" }, "Drop it");
    var no = el("button", { type: "button", "data-act": "drop-no" }, "Cancel");
    box.appendChild(yes);
    box.appendChild(no);
    cell.replaceChildren(box);
    no.focus();
    no.addEventListener("click", function () {
      cell.replaceChildren.apply(cell, saved);
      release();
    });
    yes.addEventListener("click", function () {
      yes.disabled = no.disabled = true;
      release();
      queueAction("/api/queue/drop/" + enc(id), "Drop " + id, function (a) {
        return "Message " + a.dropped + " was dropped; it will not be delivered.";
      });
    });
  }

  // --- test mail: each step as the relay reports it (application/x-ndjson) ---------------
  function testMail(device, input, button) {
    var to = input.value.trim();
    if (!to || (input.checkValidity && !input.checkValidity())) {
      input.focus();
      if (input.reportValidity) input.reportValidity();
      return;
    }
    var c = card("Test mail from " + device + " to " + to);
    c.running(true);
    button.disabled = true;
    var steps = el("ol", { "class": "steps" });
    c.body.appendChild(steps);
    var result = null;
    function handle(line) {
      line = line.trim();
      if (!line) return;
      var o = JSON.parse(line);
      if (o.step) {
        var s = o.step;
        var li = el("li", s.ok ? {} : { "class": "bad" }, (s.ok ? "✓ " : "✗ ") + s.name);
        if (s.ms !== undefined && s.ms !== null) li.appendChild(el("small", {}, s.ms + " ms"));
        if (s.detail) li.appendChild(el("small", {}, s.detail));
        steps.appendChild(li);
      } else if (o.result) {
        result = o.result;
        var r = o.result;
        if (r.delivered) c.ok("Delivered" + (r.reply ? ": " + r.reply : "."));
        else c.fail("Not delivered" + (r.reply ? ": " + r.reply : "."));
        if (r.hint) c.line(r.hint);
      } else if (o.error) {
        c.fail(String(o.error));
      }
    }
    return post("/api/test", { device: device, to: to })
      .then(function (resp) {
        if (!resp.ok) {
          return resp.text().then(function (t) {
            if (resp.status === 404) throw new Error("this relay has no test-mail API (/api/test)");
            throw new Error(errorText(resp.status, t));
          });
        }
        var reader = resp.body.getReader();
        var dec = new TextDecoder();
        var buf = "";
        function pump() {
          return reader.read().then(function (x) {
            if (x.done) {
              buf += dec.decode();
              handle(buf);
              return;
            }
            buf += dec.decode(x.value, { stream: true });
            var lines = buf.split("\n");
            buf = lines.pop();
            lines.forEach(handle);
            return pump();
          });
        }
        return pump().then(function () {
          if (!result) c.fail("The relay ended the test without a result.");
        });
      })
      .catch(function (e) { c.fail("Test failed: " + e.message); })
      .then(function () {
        c.running(false);
        // The button may have been replaced by a refresh meanwhile; enable whichever is there.
        document.querySelectorAll("button[data-act=test]").forEach(function (b) {
          if (b.dataset.device === device) b.disabled = false;
        });
      });
  }

  // --- wiring --------------------------------------------------------------------------
  document.addEventListener("click", function (ev) {
    var b = ev.target.closest && ev.target.closest("button[data-act]");
    if (!b || b.disabled) return;
    var d = b.dataset;
    switch (d.act) {
      case "close": b.closest(".card").remove(); break;
      case "refresh":
        refresh();
        if (refreshWanted) document.getElementById("refresh").textContent = "the refresh waits for the open confirmation";
        break;
      case "signin": signIn(d.id, d.mailbox || d.id); break;
      case "token": fetchToken(d.id); break;
      case "retry":
        queueAction("/api/queue/retry/" + enc(d.id), "Retry " + d.id, function () {
          return "Message " + d.id + " is due now; the relay tries it at once.";
        }, b);
        break;
      case "retry-all":
        queueAction("/api/queue/retry/all", "Retry all", function (a) {
          return a.retried + " message(s) made due now.";
        }, b);
        break;
      case "drop": confirmDrop(b); break;
      case "test": {
        var input = b.parentNode.querySelector("input[data-device]");
        if (input) testMail(d.device, input, b);
        break;
      }
    }
  });
  document.addEventListener("keydown", function (ev) {
    var t = ev.target;
    if (ev.key === "Enter" && t.matches && t.matches("input[data-device]")) {
      var b = t.parentNode.querySelector("button[data-act=test]");
      if (b && !b.disabled) b.click();
    }
  });
  // Leaving a field lets a refresh that waited for it run.
  document.addEventListener("focusout", function () { if (refreshWanted) setTimeout(refresh, 0); });

  reveal(document);
  document.getElementById("refresh").textContent = "refreshed every " + REFRESH_MS / 1000 + " s";
  setInterval(refresh, REFRESH_MS);
})();
