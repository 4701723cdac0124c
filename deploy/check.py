#!/usr/bin/env python3
"""Checks the deployment files in deploy/ as far as this machine allows.

    python3 deploy/check.py [--bin target/debug/mfd-relay] [--strict]

- metrics: the names (and label names) come from src/metrics.rs, the one place they are
  defined; every expression in the alert rules and the dashboard may use only those;
- Prometheus: the rules parse and have what an operator needs; `promtool check rules`,
  `promtool test rules` (the unit tests beside them) and `promtool check config`;
- Grafana: the dashboard's structure (ids, grid, data source variable, queries);
- systemd: the unit has the hardening it promises; `systemd-analyze verify` and the
  `systemd-analyze security --offline` exposure score;
- Docker: multi-stage, non-root, OpenSSL's headers in the build stage only (the legacy-TLS
  listener links the system OpenSSL), no native-tls in Cargo.lock;
- Kubernetes: every manifest parses, has its required fields (and, with the `kubernetes`
  Python package installed, only fields its API knows), and the pieces fit together: labels,
  selectors, named ports, volumes, Secret keys, the config.toml in the ConfigMap (checked
  with `mfd-relay check` when --bin is given), `kubectl kustomize` when kubectl is there.

A tool that is missing is reported as skipped (with --strict, as a failure). Exit status 0
when everything checked passed; 1 on a failure; 3 when PyYAML itself is missing.
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover
    print("deploy/check.py needs PyYAML: apt-get install python3-yaml (or pip install pyyaml)")
    sys.exit(3)

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent


class Report:
    def __init__(self, strict):
        self.strict = strict
        self.oks = 0
        self.skips = []
        self.fails = []
        self.section = ""

    def start(self, name):
        self.section = name
        print(f"== {name}")

    def ok(self, what):
        self.oks += 1
        print(f"  ok: {what}")

    def fail(self, what):
        self.fails.append(f"{self.section}: {what}")
        print(f"  FAIL: {what}")

    def check(self, cond, what):
        if cond:
            self.ok(what)
        else:
            self.fail(what)
        return cond

    def skip(self, what):
        if self.strict:
            self.fail(f"(strict) {what}")
        else:
            self.skips.append(f"{self.section}: {what}")
            print(f"  skipped: {what}")


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# --------------------------------------------------------------------------------------------
# Metrics from src/metrics.rs
# --------------------------------------------------------------------------------------------

def metric_catalogue():
    """{name: {"labels": set, "histogram": bool}} from the statics of src/metrics.rs."""
    text = (ROOT / "src/metrics.rs").read_text()
    body = text.split("pub fn init()")[0]
    out = {}
    for block in re.split(r"\npub static ", body)[1:]:
        m = re.search(r'"(mfd_relay_[a-z0-9_]+)"', block)
        if not m:
            continue
        labels = re.search(r"&\[((?:\s*\"[a-z_]+\",?\s*)+)\]", block)
        out[m.group(1)] = {
            "labels": set(re.findall(r'"([a-z_]+)"', labels.group(1))) if labels else set(),
            "histogram": "Histogram" in block.split("=", 1)[0] or "HistogramOpts" in block,
        }
    return out


SERIES_LABELS = {"job", "instance"}
FUNCTION_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}


def resolve(name, catalogue):
    """The catalogue entry a series name refers to (histogram series carry a suffix)."""
    if name in catalogue:
        return name, catalogue[name]
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)] if name.endswith(suffix) else None
        if base in catalogue and catalogue[base]["histogram"]:
            labels = set(catalogue[base]["labels"]) | ({"le"} if suffix == "_bucket" else set())
            return base, {"labels": labels, "histogram": True}
    return None, None


def check_expr(rep, where, expr, catalogue, used):
    """Metric names, matcher labels and grouping labels of one PromQL expression."""
    names = set(re.findall(r"\b(mfd_relay_[a-z0-9_]+)", expr))
    known = {}
    for n in sorted(names):
        base, entry = resolve(n, catalogue)
        if entry is None:
            rep.fail(f"{where}: {n} is not defined in src/metrics.rs")
            continue
        used.add(base)
        known[n] = entry
    for n, matchers in re.findall(r"\b(mfd_relay_[a-z0-9_]+)\{([^}]*)\}", expr):
        if n not in known:
            continue
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
            if label not in known[n]["labels"] | SERIES_LABELS:
                rep.fail(f"{where}: {n} has no label {label!r}")
    all_labels = set().union(*(e["labels"] for e in known.values())) if known else set()
    for group in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr):
        for label in [g.strip() for g in group.split(",") if g.strip()]:
            if label not in all_labels | SERIES_LABELS | {"le"}:
                rep.fail(f"{where}: groups by {label!r}, which none of its metrics has")
    return bool(names)


# --------------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------------

REQUIRED_ALERTS = {
    "MfdRelayDown": "relay down",
    "MfdRelayIdentityNeedsLogin": "token needs login",
    "MfdRelayQueueOld": "queue age",
    "MfdRelayDeliveryFailures": "delivery failures",
    "MfdRelayMailboxNotChecked": "no IMAP check for long",
    "MfdRelayClientCertificateExpiring": "client certificate expiring",
}


def check_prometheus(rep, catalogue, used):
    rep.start("Prometheus alert rules")
    rules_path = DEPLOY / "prometheus/mfd-relay-alerts.yml"
    doc = yaml.safe_load(rules_path.read_text())
    rules = [r for g in doc.get("groups", []) for r in g.get("rules", [])]
    names = [r.get("alert") for r in rules]
    rep.check(len(names) == len(set(names)), f"{len(rules)} alert rules, names unique")
    for alert, what in REQUIRED_ALERTS.items():
        rep.check(alert in names, f"{what}: {alert}")
    for r in rules:
        a = r.get("alert", "?")
        problems = []
        if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            problems.append("severity label critical|warning|info")
        for k in ("summary", "description"):
            if not r.get("annotations", {}).get(k):
                problems.append(f"annotation {k}")
        if not isinstance(r.get("expr"), str) or not r["expr"].strip():
            problems.append("expr")
        if problems:
            rep.fail(f"{a}: missing {', '.join(problems)}")
        if isinstance(r.get("expr"), str):
            check_expr(rep, a, r["expr"], catalogue, used)
        if "job=" in r.get("expr", "") and 'job="mfd-relay"' not in r["expr"]:
            rep.fail(f"{a}: the job is called mfd-relay")
    rep.ok("every rule has a severity, a summary and a description; its metrics exist")

    promtool = shutil.which("promtool")
    if not promtool:
        rep.skip("promtool not installed (apt-get install prometheus): rules not checked by Prometheus itself")
        return
    for args, what in (
        (["check", "rules", "mfd-relay-alerts.yml"], "promtool check rules"),
        (["test", "rules", "mfd-relay-alerts.test.yml"], "promtool test rules (alert unit tests)"),
        (["check", "config", "prometheus.example.yml"], "promtool check config prometheus.example.yml"),
    ):
        p = run([promtool, *args], cwd=DEPLOY / "prometheus")
        if not rep.check(p.returncode == 0, what):
            print(p.stdout + p.stderr)


# --------------------------------------------------------------------------------------------
# Grafana
# --------------------------------------------------------------------------------------------

PANEL_TYPES = {"row", "stat", "timeseries", "state-timeline", "table", "bargauge", "gauge", "heatmap", "text"}


def check_grafana(rep, catalogue, used):
    rep.start("Grafana dashboard")
    path = DEPLOY / "grafana/mfd-relay-dashboard.json"
    dash = json.loads(path.read_text())
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        rep.check(key in dash, f"has {key}")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    rep.check(variables.get("datasource", {}).get("type") == "datasource", "a data source variable (import picks the Prometheus)")
    rep.check("instance" in variables, "an instance variable")
    panels = []
    for p in dash["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))
    ids = [p.get("id") for p in panels]
    rep.check(len(ids) == len(set(ids)) and None not in ids, f"{len(panels)} panels with unique ids")
    boxes = []
    queries = 0
    for p in panels:
        where = f"panel {p.get('id')} {p.get('title')!r}"
        if p.get("type") not in PANEL_TYPES:
            rep.fail(f"{where}: unknown type {p.get('type')!r}")
        if not p.get("title"):
            rep.fail(f"{where}: no title")
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in ("h", "w", "x", "y")) or g["x"] + g["w"] > 24 or g["w"] < 1:
            rep.fail(f"{where}: gridPos {g}")
            continue
        boxes.append((where, g))
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            rep.fail(f"{where}: data source is not the ${{datasource}} variable")
        if not p.get("targets"):
            rep.fail(f"{where}: no queries")
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            queries += 1
            if not check_expr(rep, where, expr, catalogue, used) and "up{" not in expr:
                rep.fail(f"{where}: query {expr!r} reads no mfd-relay metric")
            for n in re.findall(r"\b(mfd_relay_[a-z0-9_]+)(\{[^}]*\})?", expr):
                if 'instance=~"$instance"' not in n[1]:
                    rep.fail(f"{where}: {n[0]} is not filtered by $instance")
            if t.get("datasource", {}).get("uid") != "${datasource}":
                rep.fail(f"{where}: a query's data source is not ${{datasource}}")
    overlaps = [
        (a, b)
        for i, (a, ga) in enumerate(boxes)
        for (b, gb) in boxes[i + 1:]
        if ga["x"] < gb["x"] + gb["w"] and gb["x"] < ga["x"] + ga["w"] and ga["y"] < gb["y"] + gb["h"] and gb["y"] < ga["y"] + ga["h"]
    ]
    rep.check(not overlaps, "no two panels overlap" + (f": {overlaps}" if overlaps else ""))
    rep.ok(f"{queries} queries use only metrics and labels of src/metrics.rs, each filtered by $instance")


# --------------------------------------------------------------------------------------------
# systemd
# --------------------------------------------------------------------------------------------

def unit_directives(text):
    """[(section, key, value)] in order; keys may repeat (ExecReload=, SystemCallFilter=)."""
    out, section = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def check_systemd(rep, binary):
    rep.start("systemd unit")
    path = DEPLOY / "systemd/mfd-relay.service"
    text = path.read_text()
    d = unit_directives(text)
    svc = {}
    for section, k, v in d:
        if section == "Service":
            svc.setdefault(k, []).append(v)

    def has(key, value=None):
        vals = svc.get(key, [])
        return bool(vals) if value is None else value in vals

    rep.check(has("User", "mfd-relay") and has("Group", "mfd-relay"), "runs as the dedicated user mfd-relay")
    rep.check(has("StateDirectory", "mfd-relay") and has("WorkingDirectory", "/var/lib/mfd-relay"), "StateDirectory=mfd-relay (/var/lib/mfd-relay)")
    rep.check(has("ProtectSystem", "strict"), "ProtectSystem=strict")
    rep.check(has("NoNewPrivileges", "yes"), "NoNewPrivileges=yes")
    rep.check(
        has("AmbientCapabilities", "CAP_NET_BIND_SERVICE") and has("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        "CAP_NET_BIND_SERVICE (ambient) and nothing else in the bounding set",
    )
    rep.check(any("kill -HUP $MAINPID" in v for v in svc.get("ExecReload", [])), "ExecReload sends SIGHUP")
    rep.check(any(re.search(r"mfd-relay run -c \S+", v) for v in svc.get("ExecStart", [])), "ExecStart runs `mfd-relay run -c ...`")
    rep.check("PrivateUsers" not in svc, "no PrivateUsers= (it would void CAP_NET_BIND_SERVICE)")
    sysusers = (DEPLOY / "systemd/mfd-relay.sysusers.conf").read_text()
    rep.check(re.search(r"^u mfd-relay - ", sysusers, re.M) is not None, "sysusers.d creates the user")

    sa = shutil.which("systemd-analyze")
    if not sa:
        rep.skip("systemd-analyze not installed: unit not verified by systemd")
        return
    exe = binary or shutil.which("true")
    with tempfile.TemporaryDirectory() as tmp:
        # verify insists that ExecStart's program exists: point it at one that does.
        unit = Path(tmp) / "mfd-relay.service"
        unit.write_text(text.replace("/usr/local/bin/mfd-relay", str(Path(exe).resolve())))
        p = run([sa, "verify", str(unit)])
        if not rep.check(p.returncode == 0 and not p.stderr.strip(), "systemd-analyze verify: no warnings"):
            print(p.stdout + p.stderr)
        p = run([sa, "security", "--offline=yes", "--no-pager", str(unit)])
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", p.stdout + p.stderr)
        if m:
            rep.check(float(m.group(1)) <= 2.0, f"systemd-analyze security --offline: exposure {m.group(1)} (at most 2.0)")
        else:
            rep.skip("systemd-analyze security --offline gave no score (systemd < 250?)")


# --------------------------------------------------------------------------------------------
# Docker
# --------------------------------------------------------------------------------------------

def final_build_lines(lines):
    """The lines of the first (build) stage."""
    froms = [i for i, l in enumerate(lines) if l.upper().startswith("FROM ")]
    return lines[froms[0]:froms[1]] if len(froms) > 1 else lines


def check_docker(rep):
    rep.start("Dockerfile")
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.strip().startswith("#")]
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    rep.check(len(froms) >= 2 and " AS " in froms[0].upper(), f"multi-stage ({len(froms)} stages)")
    final = lines[lines.index(froms[-1]):]
    users = [l.split()[1] for l in final if l.upper().startswith("USER ")]
    rep.check(bool(users) and users[-1].split(":")[0] not in ("0", "root"), f"the runtime stage runs as a non-root user ({users[-1] if users else 'none'})")
    rep.check(any("cargo build --release --locked" in l for l in lines), "builds with --release --locked")
    rep.check(any(l.upper().startswith("ENTRYPOINT") for l in final), "has an ENTRYPOINT")
    build = lines[: lines.index(froms[-1])]
    rep.check(any(re.search(r"apt-get install.*libssl-dev", l) for l in build), "the build stage has OpenSSL's headers (legacy-TLS listener)")
    rep.check(not any(l.upper().startswith("RUN ") for l in final), "the runtime stage runs nothing (distroless, libssl3 included)")
    lock = (ROOT / "Cargo.lock").read_text()
    bad = sorted(set(re.findall(r'name = "(native-tls|openssl-probe)"', lock)))
    rep.check(not bad, "Cargo.lock has no native-tls (OpenSSL only for the legacy listener)" + (f": {bad}" if bad else ""))
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    needed = ["Cargo.toml", "Cargo.lock", "src/"]
    try:
        import tomllib

        manifest = tomllib.loads((ROOT / "Cargo.toml").read_text())
        # Declared targets must exist for cargo to read the manifest at all.
        for kind, default_dir in (("bench", "benches/"), ("test", "tests/"), ("example", "examples/"), ("bin", "src/")):
            for t in manifest.get(kind, []):
                needed.append(t["path"].split("/")[0] + "/" if "path" in t else default_dir)
    except ImportError:
        rep.skip("Python < 3.11 (no tomllib): declared targets not checked")
    copied = " ".join(l for l in final_build_lines(lines) if l.upper().startswith("COPY "))
    for n in dict.fromkeys(needed):
        rep.check(f"!{n}" in ignore and n.rstrip("/") in copied, f"the build gets {n} (Dockerfile.dockerignore and COPY)")
    if shutil.which("docker") and run(["docker", "info"]).returncode == 0:
        rep.skip("a Docker engine is here, but building the image is left to `docker build -f deploy/Dockerfile .`")
    else:
        rep.skip("no Docker engine: the image was not built")


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------

def k8s_schema_errors(obj):
    """Unknown fields, missing required ones and wrong types, by the models of the
    `kubernetes` Python package (pydantic models since its version 35: a full check; older
    versions: unknown fields only). None when the package or the kind is not there."""
    try:
        from kubernetes import client
    except ImportError:
        return None
    version = obj["apiVersion"].split("/")[-1].capitalize()
    cls = getattr(client, f"{version}{obj['kind']}", None)
    if cls is None:
        return None
    if hasattr(cls, "model_validate"):
        try:
            cls.model_validate(obj)
            return []
        except Exception as e:  # pydantic.ValidationError
            if hasattr(e, "errors"):
                return [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
            return [str(e)]
    errors = []

    def walk(value, type_name, path):
        m = re.match(r"(?:List|list)\[(.+)\]$", type_name)
        if m and isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, m.group(1), f"{path}[{i}]")
            return
        model = getattr(client, type_name, None)
        if model is None or not isinstance(value, dict) or not hasattr(model, "attribute_map"):
            return
        by_json = {j: py for py, j in model.attribute_map.items()}
        for k, v in value.items():
            if k not in by_json:
                errors.append(f"{path}.{k}: not a field of {type_name}")
            else:
                walk(v, model.openapi_types[by_json[k]], f"{path}.{k}")

    walk(obj, cls.__name__, obj["kind"])
    return errors


def check_k8s(rep, binary):
    rep.start("Kubernetes manifests")
    kdir = DEPLOY / "k8s"
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    files = kust.get("resources", [])
    on_disk = sorted(p.name for p in kdir.glob("*.yaml") if p.name != "kustomization.yaml")
    rep.check(sorted(files) == on_disk, f"kustomization.yaml lists every manifest ({', '.join(files)})")
    objs = []
    for f in files:
        for doc in yaml.safe_load_all((kdir / f).read_text()):
            if doc:
                objs.append(doc)
    for o in objs:
        missing = [k for k in ("apiVersion", "kind") if not o.get(k)] + ([] if o.get("metadata", {}).get("name") else ["metadata.name"])
        if missing:
            rep.fail(f"{o.get('kind')}: missing {missing}")
    rep.ok(f"{len(objs)} objects parse, each with apiVersion, kind and metadata.name")

    def one(kind, name=None):
        found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
        if not rep.check(len(found) == 1, f"one {kind}{' ' + name if name else ''}"):
            return {}
        return found[0]

    sts = one("StatefulSet")
    cm = one("ConfigMap")
    secret = one("Secret")
    mon = one("ServiceMonitor")
    netpol = one("NetworkPolicy")
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    rep.check(len(services) == 2, f"two Services ({', '.join(services)})")

    schema_errors = []
    for o in objs:
        errs = k8s_schema_errors(o)
        if errs is None:
            continue
        schema_errors.extend(f"{o['kind']}/{o['metadata']['name']}: {e}" for e in errs)
    if importlib.util.find_spec("kubernetes"):
        rep.check(not schema_errors, "fields known to the Kubernetes API (models of the kubernetes package)" + "".join(f"\n      {e}" for e in schema_errors))
    else:
        rep.skip("pip package kubernetes not installed: fields not checked against the API's models")

    if not sts:
        return
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"].get("labels", {})
    rep.check(spec.get("replicas") == 1, "StatefulSet: exactly one replica (one process per sled database)")
    rep.check(all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items()), "StatefulSet: selector matches the pod's labels")
    governing = services.get(spec.get("serviceName"), {})
    rep.check(governing.get("spec", {}).get("clusterIP") == "None", f"StatefulSet: serviceName {spec.get('serviceName')} is a headless Service")
    c = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    rep.check({"smtp", "admin"} <= set(ports), f"container ports named smtp and admin ({ports})")
    sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
    rep.check(
        psc.get("runAsNonRoot") is True and sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True
        and "ALL" in sc.get("capabilities", {}).get("drop", []) and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        "non-root, no privilege escalation, read-only root, all capabilities dropped, seccomp RuntimeDefault",
    )
    rep.check(pod.get("automountServiceAccountToken") is False, "no service account token mounted (the relay needs no API access)")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe)
        if not rep.check(p is not None, f"{probe} present"):
            continue
        port = (p.get("tcpSocket") or p.get("httpGet") or {}).get("port")
        if isinstance(port, str):
            rep.check(port in ports, f"{probe} uses the named port {port}")
    rep.check(pod.get("terminationGracePeriodSeconds", 30) >= 35, "terminationGracePeriodSeconds leaves the relay's 30 s shutdown grace")

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    for name in mounts:
        rep.check(name in volumes or name in claims, f"volume mount {name} has a volume or claim")
    config_vol = next((n for n, v in volumes.items() if v.get("configMap", {}).get("name") == cm.get("metadata", {}).get("name")), None)
    secret_vol = next((n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == secret.get("metadata", {}).get("name")), None)
    rep.check(config_vol in mounts and secret_vol in mounts, "the ConfigMap and the Secret are mounted")
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            rep.check(ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys, f"env {e['name']} comes from a key of the Secret")

    # The config.toml in the ConfigMap against the pod it runs in.
    args = c.get("args", [])
    config_path = args[args.index("-c") + 1] if "-c" in args else None
    config_dir = mounts.get(config_vol, "")
    rep.check(config_path == f"{config_dir}/config.toml" and "config.toml" in cm.get("data", {}), f"the relay reads {config_path}, the ConfigMap's config.toml")
    try:
        import tomllib
    except ImportError:
        tomllib = None
    text = cm.get("data", {}).get("config.toml", "")
    if tomllib:
        conf = tomllib.loads(text)
        data_claim = next((n for n in claims if n in mounts), None)
        rep.check(conf.get("relay", {}).get("data_dir") == mounts.get(data_claim), f"data_dir is the volume ({mounts.get(data_claim)})")
        for l in conf.get("listener", []):
            port = int(l["listen"].rsplit(":", 1)[1])
            rep.check(port in ports.values(), f"listener {l['listen']} is a container port")
        admin = conf.get("admin", {}).get("listen", "127.0.0.1:9925")
        rep.check(admin.startswith("0.0.0.0:") and int(admin.rsplit(":", 1)[1]) == ports.get("admin"), f"[admin] listen {admin} is reachable on the admin port")
    else:
        rep.skip("Python < 3.11 (no tomllib): config.toml not cross-checked")
    secret_dir = mounts.get(secret_vol, "/nonexistent")
    referenced = re.findall(re.escape(secret_dir) + r"/([A-Za-z0-9._-]+)", text)
    for f in referenced:
        rep.check(f in secret_keys, f"config.toml's {secret_dir}/{f} is a key of the Secret")
    if binary:
        with tempfile.TemporaryDirectory() as tmp:
            # Stand-ins for the Secret's files: a real certificate pair for *.pem.
            run([binary, "make-cert", "--name", "relay.test", "--dir", tmp])
            pair = {n: (Path(tmp) / n).read_bytes() for n in ("relay.pem", "relay-key.pem") if (Path(tmp) / n).exists()}
            for k in secret_keys:
                stand_in = pair.get("relay-key.pem" if "key" in k else "relay.pem") if k.endswith(".pem") else None
                (Path(tmp) / k).write_bytes(stand_in or b"placeholder\n")
            conf_file = Path(tmp) / "config.toml"
            conf_file.write_text(text.replace(secret_dir + "/", tmp + "/"))
            p = run([binary, "check", "-c", str(conf_file)])
            if not rep.check(p.returncode == 0, "`mfd-relay check` accepts the ConfigMap's config.toml"):
                print(p.stdout + p.stderr)
    else:
        rep.skip("no --bin: the ConfigMap's config.toml was not run through `mfd-relay check`")

    # Services, ServiceMonitor, NetworkPolicy.
    for name, s in services.items():
        sel = s["spec"].get("selector", {})
        rep.check(sel and all(labels.get(k) == v for k, v in sel.items()), f"Service {name} selects the relay's pod")
        for p in s["spec"].get("ports", []):
            tp = p.get("targetPort")
            rep.check(tp in ports or tp in ports.values(), f"Service {name} port {p.get('name')} targets container port {tp}")
    lb = [s for s in services.values() if s["spec"].get("type") == "LoadBalancer"]
    rep.check(bool(lb) and all(s["spec"].get("externalTrafficPolicy") == "Local" for s in lb), "the devices' Service keeps their source addresses (externalTrafficPolicy: Local)")
    if mon:
        want = mon["spec"]["selector"]["matchLabels"]
        picked = [s for s in services.values() if all(s["metadata"].get("labels", {}).get(k) == v for k, v in want.items())]
        rep.check(len(picked) == 1, f"ServiceMonitor selects exactly one Service ({[s['metadata']['name'] for s in picked]})")
        if picked:
            names = {p.get("name") for p in picked[0]["spec"]["ports"]}
            for ep in mon["spec"]["endpoints"]:
                rep.check(ep.get("port") in names and ep.get("path") == "/metrics", f"ServiceMonitor scrapes {ep.get('port')} {ep.get('path')}")
            job = picked[0]["metadata"].get("labels", {}).get(mon["spec"].get("jobLabel", ""), picked[0]["metadata"]["name"])
            rep.check(job == "mfd-relay", f'the scrape job is "mfd-relay", as the alert rules expect (got {job!r})')
        rep.check(mon.get("apiVersion") == "monitoring.coreos.com/v1", "ServiceMonitor is monitoring.coreos.com/v1")
    if netpol:
        np_ports = [p.get("port") for r in netpol["spec"].get("ingress", []) for p in r.get("ports", [])]
        rep.check(all(p in ports or p in ports.values() for p in np_ports), f"NetworkPolicy ports exist ({np_ports})")
        rep.check(all(labels.get(k) == v for k, v in netpol["spec"]["podSelector"]["matchLabels"].items()), "NetworkPolicy selects the relay's pod")

    kubectl = shutil.which("kubectl")
    if kubectl:
        p = run([kubectl, "kustomize", str(kdir)])
        built = [d for d in yaml.safe_load_all(p.stdout)] if p.returncode == 0 else []
        if not rep.check(p.returncode == 0 and len([d for d in built if d]) == len(objs), f"kubectl kustomize builds {len(objs)} objects"):
            print(p.stderr)
        rep.skip("no cluster here: not applied (kubectl apply --dry-run needs an API server)")
    else:
        rep.skip("kubectl not installed: kustomization not built")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", help="the mfd-relay binary (for `mfd-relay check` and systemd-analyze verify)")
    ap.add_argument("--strict", action="store_true", help="a missing tool is a failure")
    a = ap.parse_args()
    binary = a.bin or os.environ.get("MFD_RELAY_BIN")
    rep = Report(a.strict)
    catalogue = metric_catalogue()
    print(f"src/metrics.rs defines {len(catalogue)} metrics")
    used = set()
    check_prometheus(rep, catalogue, used)
    check_grafana(rep, catalogue, used)
    rep.start("metric coverage")
    unused = sorted(set(catalogue) - used)
    rep.check(not unused, "every metric of src/metrics.rs is in an alert or a dashboard panel" + (f"; not: {unused}" if unused else ""))
    check_systemd(rep, binary)
    check_docker(rep)
    check_k8s(rep, binary)
    print()
    for s in rep.skips:
        print(f"skipped: {s}")
    if rep.fails:
        for f in rep.fails:
            print(f"FAILED: {f}")
        print(f"{len(rep.fails)} check(s) failed, {rep.oks} passed, {len(rep.skips)} skipped")
        return 1
    print(f"all checks passed ({rep.oks} ok, {len(rep.skips)} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
