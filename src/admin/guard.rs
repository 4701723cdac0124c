//! Which requests the admin listener takes at all, before credentials are looked at:
//! defences against a web page in the admin's own browser.
//!
//! - DNS rebinding: a page on `attacker.example` re-points its name to 127.0.0.1 and reads
//!   the listener as "same origin"; the browser then sends `Host: attacker.example`. So the
//!   `Host` header (RFC 9110 7.2) must name the listen address, `localhost`, a loopback
//!   address, the host of the redirect URI, or an `[admin] allowed_hosts` name; anything else
//!   gets 421 Misdirected Request (RFC 9110 15.5.20). An IP literal cannot be rebound, so with
//!   an unspecified listen address (`0.0.0.0`, `::`) every IP literal is taken.
//! - Cross-site requests (CSRF): a browser that remembers basic-auth credentials sends them
//!   with a form posted from any page. A state-changing request is refused (403) when its
//!   `Origin` (RFC 6454 7) is foreign or `null`, or its `Sec-Fetch-Site` is `cross-site`; and
//!   it must carry `Content-Type: application/json` (415 otherwise), which no HTML form can
//!   send and which a script on another origin can only send after a CORS preflight that
//!   this listener never approves.
//!
//! `/metrics`, `/healthz` and `/readyz` are exempt from the `Host` check: Prometheus and
//! Kubernetes probes address the pod or host by IP or by a Service name the relay cannot
//! know, they only read, and `/metrics` still asks for credentials when they are set.

use std::net::{IpAddr, SocketAddr};

use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};

/// The host names and addresses the listener answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPolicy {
    /// The listen address.
    listen: IpAddr,
    /// Lower-case names: `localhost`, the redirect URI's host, `allowed_hosts`.
    names: Vec<String>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The `Host` header names something else (or is missing).
    Host,
    /// `Origin` is another site, or `null`.
    ForeignOrigin,
    /// `Sec-Fetch-Site: cross-site`.
    CrossSite,
    /// A state-changing request without a JSON body.
    NotJson,
}

impl Refusal {
    /// The answer: 421, 403 or 415, with a line a person can act on.
    pub fn response(self) -> Response {
        let (status, text) = match self {
            Refusal::Host => (
                StatusCode::MISDIRECTED_REQUEST,
                "this admin listener does not answer to that Host name; add it to [admin] allowed_hosts if it is yours\n",
            ),
            Refusal::ForeignOrigin => (StatusCode::FORBIDDEN, "requests from another site are refused\n"),
            Refusal::CrossSite => (StatusCode::FORBIDDEN, "cross-site requests are refused\n"),
            Refusal::NotJson => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "send a JSON body (Content-Type: application/json)\n")
            }
        };
        (status, text).into_response()
    }
}

/// The host part of a `Host` header or URL authority, lower case, without port, brackets
/// or a trailing dot.
fn host_part(authority: &str) -> Option<String> {
    let a = authority.trim();
    let host = if let Some(rest) = a.strip_prefix('[') {
        rest.split_once(']')?.0
    } else {
        match a.rsplit_once(':') {
            Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return None,
            None => a,
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

impl HostPolicy {
    /// `listen`: the `[admin] listen` address; `redirect_uri`: where sign-ins come back;
    /// `allowed`: `[admin] allowed_hosts`.
    pub fn new(listen: SocketAddr, redirect_uri: &str, allowed: &[String]) -> HostPolicy {
        let mut names = vec!["localhost".to_string()];
        let redirect_host = url::Url::parse(redirect_uri).ok().and_then(|u| u.host_str().map(str::to_string));
        for n in redirect_host.iter().chain(allowed) {
            if let Some(h) = host_part(n) {
                if !names.contains(&h) {
                    names.push(h);
                }
            }
        }
        HostPolicy { listen: listen.ip(), names }
    }

    /// Whether a `Host` header value names this listener.
    pub fn host_allowed(&self, host: &str) -> bool {
        let Some(h) = host_part(host) else { return false };
        if let Ok(ip) = h.parse::<IpAddr>() {
            return ip.is_loopback() || ip == self.listen || self.listen.is_unspecified() || self.names.contains(&h);
        }
        self.names.contains(&h)
    }

    /// Whether an `Origin` value is this listener's own (same authority as `Host`) or one
    /// of the configured names.
    fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let Some((scheme, authority)) = origin.trim().split_once("://") else { return false };
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return false;
        }
        if authority.eq_ignore_ascii_case(host.trim()) {
            return true;
        }
        // Behind a reverse proxy the browser's origin is the proxy's name.
        host_part(authority).is_some_and(|h| self.names.contains(&h) && h != "localhost")
    }
}

/// Paths read by scrapers and probes, which address the listener by whatever name or IP
/// they have; they only read.
fn probe_path(path: &str) -> bool {
    matches!(path, "/metrics" | "/healthz" | "/readyz")
}

/// Methods that change nothing (RFC 9110 9.2.1).
fn safe_method(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The request policy as a pure function of method, path and headers.
pub fn check(policy: &HostPolicy, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Refusal> {
    if probe_path(path) && safe_method(method) {
        return Ok(());
    }
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST).unwrap_or("");
    if !policy.host_allowed(host) {
        return Err(Refusal::Host);
    }
    if safe_method(method) {
        return Ok(());
    }
    if headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("cross-site"))
    {
        return Err(Refusal::CrossSite);
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let ok = origin.to_str().ok().is_some_and(|o| policy.origin_allowed(o, host));
        if !ok {
            return Err(Refusal::ForeignOrigin);
        }
    }
    let json = text(header::CONTENT_TYPE)
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(Refusal::NotJson);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("an address")
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn loopback() -> HostPolicy {
        HostPolicy::new(addr("127.0.0.1:9925"), "http://localhost:9925/oauth/callback", &["relay.example.com".into()])
    }

    #[test]
    fn host_names_the_listener() {
        let p = loopback();
        for ok in [
            "127.0.0.1:9925",
            "127.0.0.1",
            "localhost:9925",
            "LOCALHOST",
            "[::1]:9925",
            "relay.example.com",
            "relay.example.com.:443",
        ] {
            assert!(p.host_allowed(ok), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:9925",
            "",
            "10.0.0.5:9925",
            "localhost.attacker.example",
            "relay.example.com.evil",
            "a:b:c",
        ] {
            assert!(!p.host_allowed(bad), "{bad}");
        }
        // Listening everywhere: any IP literal (cannot be rebound), still no foreign names.
        let any = HostPolicy::new(addr("0.0.0.0:9925"), "http://relay.lan:9925/oauth/callback", &[]);
        assert!(any.host_allowed("10.0.0.5:9925") && any.host_allowed("relay.lan"));
        assert!(!any.host_allowed("attacker.example"));
        let lan = HostPolicy::new(addr("192.0.2.7:9925"), "http://localhost:9925/oauth/callback", &[]);
        assert!(lan.host_allowed("192.0.2.7:9925") && !lan.host_allowed("192.0.2.8:9925"));
    }

    #[test]
    fn reads_are_checked_for_host_only_and_probes_not_at_all() {
        let p = loopback();
        let rebound = headers(&[("host", "attacker.example:9925")]);
        for path in ["/status", "/api/queue", "/api/auth/status", "/oauth/callback", "/"] {
            assert_eq!(check(&p, &Method::GET, path, &rebound), Err(Refusal::Host), "{path}");
        }
        let pod_ip = headers(&[("host", "10.42.0.17:9925")]);
        for path in ["/metrics", "/healthz", "/readyz"] {
            assert_eq!(check(&p, &Method::GET, path, &pod_ip), Ok(()), "{path}");
        }
        assert_eq!(check(&p, &Method::GET, "/status", &HeaderMap::new()), Err(Refusal::Host), "no Host at all");
        let cross = headers(&[("host", "127.0.0.1:9925"), ("sec-fetch-site", "cross-site")]);
        assert_eq!(check(&p, &Method::GET, "/status", &cross), Ok(()), "a link from elsewhere may open the page");
    }

    #[test]
    fn state_changes_need_same_origin_and_json() {
        let p = loopback();
        let post = |pairs: &[(&'static str, &str)]| check(&p, &Method::POST, "/api/auth/logout/scans", &headers(pairs));
        let host = ("host", "127.0.0.1:9925");
        let json = ("content-type", "application/json");
        assert_eq!(post(&[host, json]), Ok(()), "the CLI: no Origin, JSON");
        assert_eq!(post(&[host, ("content-type", "Application/JSON; charset=utf-8")]), Ok(()));
        assert_eq!(post(&[host, json, ("origin", "http://127.0.0.1:9925"), ("sec-fetch-site", "same-origin")]), Ok(()));
        assert_eq!(post(&[host, json, ("origin", "https://relay.example.com")]), Ok(()), "through the proxy");
        assert_eq!(post(&[host, json, ("origin", "https://attacker.example")]), Err(Refusal::ForeignOrigin));
        assert_eq!(post(&[host, json, ("origin", "null")]), Err(Refusal::ForeignOrigin));
        assert_eq!(post(&[host, json, ("origin", "http://127.0.0.1:8080")]), Err(Refusal::ForeignOrigin));
        assert_eq!(post(&[host, json, ("sec-fetch-site", "cross-site")]), Err(Refusal::CrossSite));
        assert_eq!(post(&[host]), Err(Refusal::NotJson));
        assert_eq!(post(&[host, ("content-type", "application/x-www-form-urlencoded")]), Err(Refusal::NotJson));
        assert_eq!(post(&[host, ("content-type", "text/plain")]), Err(Refusal::NotJson));
        assert_eq!(post(&[("host", "attacker.example"), json]), Err(Refusal::Host));
        // A POST to a probe path is no probe.
        assert_eq!(check(&p, &Method::POST, "/metrics", &headers(&[("host", "10.1.1.1")])), Err(Refusal::Host));
    }
}
