//! Who may use the admin listener.
//!
//! Two ways in, each optional, both in the `Authorization` header (RFC 7235 section 4.2;
//! never in the query string, where URLs end up in logs and browser history):
//! - a bearer token (`[admin] token`, RFC 6750) for programs: the `mfd-relay` CLI, Prometheus;
//! - HTTP basic auth (RFC 7617; `[admin] basic_auth_user` and `basic_auth_password_hash`, an
//!   argon2 hash from `mfd-relay hash-pin`) for a person with a browser, which cannot send a
//!   bearer header but asks for a user and password when it gets a `Basic` challenge.
//!
//! With neither configured the listener is open, which is why it binds to loopback by
//! default. `/healthz` and the OAuth callback never ask (see `admin::Admin::router`).
//!
//! A browser sends the password with every request: a [`Verifier`] remembers successes, and
//! runs one argon2 check at a time off the async workers, so a flood of wrong passwords costs
//! one core at most and never stalls `/metrics`.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use crate::credentials::Verifier;

/// The realm named in challenges (RFC 7235 section 2.2).
pub const REALM: &str = "mfd-relay admin";

/// What [`Access::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No credentials sent.
    Missing,
    /// Credentials sent, and wrong (or unreadable): a failed login.
    Wrong,
}

/// The credentials a request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// No `Authorization` header.
    Missing,
    Bearer(String),
    Basic {
        user: String,
        password: String,
    },
    /// A header we cannot read (unknown scheme, bad base64, no colon...).
    Unusable,
}

/// Reads an `Authorization` header value. Scheme names are case-insensitive (RFC 7235
/// section 2.1); basic credentials are `base64(user ":" password)` in UTF-8 (RFC 7617
/// section 2), the user being everything before the first colon.
pub fn parse_authorization(value: Option<&str>) -> Credentials {
    let Some(value) = value else { return Credentials::Missing };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Credentials::Bearer(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded =
            base64::engine::general_purpose::STANDARD.decode(rest).ok().and_then(|b| String::from_utf8(b).ok());
        if let Some((user, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) {
            return Credentials::Basic { user: user.to_string(), password: password.to_string() };
        }
    }
    Credentials::Unusable
}

/// The admin listener's access rule.
pub struct Access {
    token: Option<String>,
    basic: Option<Basic>,
}

struct Basic {
    user: String,
    password_hash: String,
    passwords: Verifier,
}

impl Basic {
    async fn verify(&self, user: &str, password: &str) -> bool {
        constant_time_eq(user.as_bytes(), self.user.as_bytes())
            && self.passwords.verify(user, password, &self.password_hash).await
    }
}

impl Access {
    /// `token`: the bearer token; `basic`: (user, argon2 hash of the password).
    pub fn new(token: Option<String>, basic: Option<(String, String)>) -> Access {
        let basic = basic.map(|(user, password_hash)| Basic { user, password_hash, passwords: Verifier::new(1) });
        Access { token: token.filter(|t| !t.is_empty()), basic }
    }

    /// No credentials configured: everyone who reaches the listener may use it.
    pub fn is_open(&self) -> bool {
        self.token.is_none() && self.basic.is_none()
    }

    pub fn has_basic(&self) -> bool {
        self.basic.is_some()
    }

    /// Whether a request with these headers may pass.
    pub async fn allows(&self, headers: &HeaderMap) -> bool {
        self.check(headers).await == Verdict::Allowed
    }

    /// What the credentials of a request are worth: a request without any is no failed
    /// login (a browser asks first without, then shows its dialog).
    pub async fn check(&self, headers: &HeaderMap) -> Verdict {
        if self.is_open() {
            return Verdict::Allowed;
        }
        let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let ok = match (parse_authorization(value), &self.token, &self.basic) {
            (Credentials::Missing, _, _) => return Verdict::Missing,
            (Credentials::Bearer(t), Some(want), _) => constant_time_eq(t.as_bytes(), want.as_bytes()),
            (Credentials::Basic { user, password }, _, Some(b)) => b.verify(&user, &password).await,
            _ => false,
        };
        if ok {
            Verdict::Allowed
        } else {
            Verdict::Wrong
        }
    }

    /// The 401 for a refused request: challenges for every configured scheme (a browser
    /// shows its login dialog for `Basic`), and a page that tells a person what to do.
    pub fn refusal(&self, wants_html: bool) -> Response {
        let mut resp = if wants_html {
            let how = if self.has_basic() {
                "Sign in with the admin user and password (<code>[admin] basic_auth_user</code>)."
            } else {
                "This listener asks for a bearer token, which a browser cannot send. To open this page \
                 in a browser, set <code>basic_auth_user</code> and <code>basic_auth_password_hash</code> \
                 (from <code>mfd-relay hash-pin</code>) in the <code>[admin]</code> section and reload."
            };
            let page = format!(
                "<!doctype html><html lang=en><meta charset=utf-8><title>mfd-relay: sign-in required</title>\
                 <body style=\"font-family:system-ui,sans-serif;margin:3em;max-width:40em\">\
                 <h1>Sign-in required</h1><p>{how}</p></body></html>"
            );
            (StatusCode::UNAUTHORIZED, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
        } else if self.has_basic() {
            (StatusCode::UNAUTHORIZED, "admin credentials required (bearer token or basic auth)\n").into_response()
        } else {
            (StatusCode::UNAUTHORIZED, "admin token required\n").into_response()
        };
        let h = resp.headers_mut();
        if self.has_basic() {
            if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{REALM}\", charset=\"UTF-8\"")) {
                h.append(header::WWW_AUTHENTICATE, v);
            }
        }
        if self.token.is_some() {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer realm=\"{REALM}\"")) {
                h.append(header::WWW_AUTHENTICATE, v);
            }
        }
        resp
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn parses_authorization_headers() {
        assert_eq!(parse_authorization(None), Credentials::Missing);
        assert_eq!(parse_authorization(Some("Bearer abc")), Credentials::Bearer("abc".into()));
        assert_eq!(parse_authorization(Some("bearer  abc ")), Credentials::Bearer("abc".into()));
        assert_eq!(parse_authorization(Some("Bearer")), Credentials::Unusable);
        let basic = format!("Basic {}", b64("admin:pa:ss wörd"));
        assert_eq!(
            parse_authorization(Some(&basic)),
            Credentials::Basic { user: "admin".into(), password: "pa:ss wörd".into() },
            "the user ends at the first colon; the password may hold colons and UTF-8"
        );
        assert_eq!(
            parse_authorization(Some(&format!("BASIC {}", b64("a:")))),
            Credentials::Basic { user: "a".into(), password: String::new() }
        );
        assert_eq!(parse_authorization(Some(&format!("Basic {}", b64("nocolon")))), Credentials::Unusable);
        assert_eq!(parse_authorization(Some("Basic !!!")), Credentials::Unusable);
        assert_eq!(parse_authorization(Some("Digest x=y")), Credentials::Unusable);
    }

    #[tokio::test]
    async fn open_without_credentials_configured() {
        let a = Access::new(None, None);
        assert!(a.is_open());
        assert!(a.allows(&headers(None)).await);
        assert!(Access::new(Some(String::new()), None).is_open(), "an empty token protects nothing: treated as none");
    }

    #[tokio::test]
    async fn bearer_token() {
        let a = Access::new(Some("t0ken".into()), None);
        assert!(a.allows(&headers(Some("Bearer t0ken"))).await);
        assert!(!a.allows(&headers(Some("Bearer t0kem"))).await);
        assert!(!a.allows(&headers(Some("Bearer t0ken2"))).await);
        assert!(!a.allows(&headers(None)).await);
        // Basic credentials are no way in while basic auth is not configured.
        assert!(!a.allows(&headers(Some(&format!("Basic {}", b64("admin:t0ken"))))).await);
    }

    #[tokio::test]
    async fn basic_auth_with_argon2_and_remembered_success() {
        let hash = crate::credentials::hash("correct horse").unwrap();
        let a = Access::new(Some("t0ken".into()), Some(("admin".into(), hash)));
        let good = format!("Basic {}", b64("admin:correct horse"));
        assert!(a.allows(&headers(Some(&good))).await);
        assert!(a.allows(&headers(Some("Bearer t0ken"))).await, "the token still works beside basic auth");
        assert!(!a.allows(&headers(Some(&format!("Basic {}", b64("admin:wrong"))))).await);
        assert!(!a.allows(&headers(Some(&format!("Basic {}", b64("root:correct horse"))))).await);
        assert!(!a.allows(&headers(None)).await);
        // A remembered success answers without argon2: far below its tens of milliseconds.
        let t = std::time::Instant::now();
        for _ in 0..100 {
            assert!(a.allows(&headers(Some(&good))).await);
        }
        assert!(t.elapsed() < std::time::Duration::from_millis(50), "{:?}", t.elapsed());
        let b = a.basic.as_ref().unwrap();
        assert_eq!(b.passwords.remembered(), 1, "failures are not remembered");
    }

    #[test]
    fn refusals_challenge_for_what_is_configured() {
        let challenges = |a: &Access, html: bool| {
            let r = a.refusal(html);
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
            r.headers().get_all(header::WWW_AUTHENTICATE).iter().map(|v| v.to_str().unwrap().to_string()).collect()
        };
        let token_only = Access::new(Some("t".into()), None);
        assert_eq!(challenges(&token_only, false), vec!["Bearer realm=\"mfd-relay admin\"".to_string()]);
        let both = Access::new(Some("t".into()), Some(("u".into(), "h".into())));
        let c: Vec<String> = challenges(&both, true);
        assert_eq!(c[0], "Basic realm=\"mfd-relay admin\", charset=\"UTF-8\"", "browsers answer the Basic one");
        assert_eq!(c.len(), 2);
        let basic_only = Access::new(None, Some(("u".into(), "h".into())));
        assert_eq!(challenges(&basic_only, false).len(), 1);
    }
}
