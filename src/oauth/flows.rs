//! Grants that need no person: client credentials (secret or certificate assertion) and the
//! Google service-account JWT bearer grant. The interactive sign-ins live in [`super::login`].

use std::time::Duration;

use serde::Deserialize;

use super::jwt::Signer;
use super::provider::ProviderInfo;
use super::tokens::{classify_response, Slot, TokenError, TokenSet};

/// The provider's client secret, from `client_secret` or `client_secret_file`.
pub fn client_secret(p: &ProviderInfo) -> Result<Option<String>, TokenError> {
    if let Some(s) = &p.client_secret {
        return Ok(Some(s.clone()));
    }
    match &p.client_secret_file {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|e| TokenError::Config(format!("client_secret_file {}: {e}", path.display()))),
        None => Ok(None),
    }
}

/// RFC 7523 2.2: the client assertion type for a signed JWT.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A client assertion signed with the provider's certificate (Microsoft app-only).
pub fn client_assertion(p: &ProviderInfo) -> Result<Option<String>, TokenError> {
    let (Some(cert), Some(key)) = (&p.client_certificate, &p.client_key) else {
        return Ok(None);
    };
    let signer = Signer::from_cert_files(cert, key).map_err(TokenError::Config)?;
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({
        "aud": p.token_url,
        "iss": p.client_id,
        "sub": p.client_id,
        "jti": random_id(),
        "nbf": now,
        "iat": now,
        "exp": now + 600,
    });
    signer.sign(&claims, None).map(Some).map_err(TokenError::Config)
}

/// A random URL-safe identifier (JWT ids, PKCE state).
pub fn random_id() -> String {
    use base64::Engine;
    let mut b = [0u8; 24];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// RFC 6749 4.4: app-only tokens with a client secret or a certificate assertion, for the
/// one resource `scopes` name (Entra refuses a request for several: AADSTS28000).
pub async fn client_credentials(
    http: &reqwest::Client,
    slot: &Slot,
    scopes: &[String],
) -> Result<TokenSet, TokenError> {
    let p = &slot.provider;
    let assertion = client_assertion(p)?;
    let secret = client_secret(p)?;
    if secret.is_none() && assertion.is_none() {
        return Err(TokenError::Config(format!(
            "provider \"{}\" has no client secret or certificate for app-only sign-in",
            p.name
        )));
    }
    let scope = scopes.join(" ");
    let mut form = vec![("grant_type", "client_credentials".to_string())];
    if !scope.is_empty() {
        form.push(("scope", scope));
    }
    if let Some(a) = assertion {
        form.push(("client_assertion_type", ASSERTION_TYPE.to_string()));
        form.push(("client_assertion", a));
    }
    let mut set = client_token_request(http, p, form).await?;
    set.account = Some(slot.email.clone());
    Ok(set)
}

/// A Google service account key file (the fields we use).
#[derive(Deserialize)]
struct ServiceAccountKey {
    client_email: String,
    private_key: String,
    private_key_id: Option<String>,
}

/// RFC 7523 2.1: a service account acting as the identity's user (domain-wide delegation),
/// with `scopes`.
pub async fn service_account(http: &reqwest::Client, slot: &Slot, scopes: &[String]) -> Result<TokenSet, TokenError> {
    let p = &slot.provider;
    let path = p
        .service_account_file
        .as_ref()
        .ok_or_else(|| TokenError::Config(format!("provider \"{}\" has no service_account_file", p.name)))?;
    let text = std::fs::read_to_string(path).map_err(|e| TokenError::Config(format!("{}: {e}", path.display())))?;
    let key: ServiceAccountKey = serde_json::from_str(&text)
        .map_err(|e| TokenError::Config(format!("{}: not a service account key ({e})", path.display())))?;
    let signer = Signer::from_key_pem(key.private_key.as_bytes())
        .map_err(|e| TokenError::Config(format!("{}: {e}", path.display())))?;
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({
        "iss": key.client_email,
        "sub": slot.email,
        "scope": scopes.join(" "),
        "aud": p.token_url,
        "iat": now,
        "exp": now + 3600,
    });
    let assertion = signer.sign(&claims, key.private_key_id.as_deref()).map_err(TokenError::Config)?;
    let mut set = post_token(
        http,
        &p.token_url,
        &[("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", &assertion)],
    )
    .await?;
    set.account = Some(slot.email.clone());
    Ok(set)
}

/// What a token endpoint answered (RFC 6749 5.1 and 5.2), once read.
#[derive(Clone)]
pub enum TokenAnswer {
    Tokens(TokenSet),
    /// An error object: its `error` code and `error_description`.
    Error {
        code: String,
        description: String,
    },
}

/// Reads a token endpoint's answer. `expires_in` may be a number or a string of digits
/// (some endpoints quote it). A body that is neither tokens nor an error object is refused
/// with the names of the fields that do not fit, never their values: a half-readable answer
/// may hold live tokens.
pub fn parse_token_response(status: u16, body: &[u8]) -> Result<TokenAnswer, String> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Err(format!(
            "the token endpoint answered HTTP {status} with {} bytes that are not a JSON object",
            body.len()
        ));
    };
    use serde_json::Value;
    if let Some(code) = map.get("error") {
        let Value::String(code) = code else {
            return Err(format!(
                "the token endpoint answered HTTP {status} with an error object whose \"error\" is not a string"
            ));
        };
        let description = match map.get("error_description") {
            Some(Value::String(d)) => crate::reply::sanitize_text(d, 500),
            _ => String::new(),
        };
        return Ok(TokenAnswer::Error { code: crate::reply::sanitize_text(code, 100), description });
    }
    if !(200..300).contains(&status) {
        return Err(format!("the token endpoint answered HTTP {status} without an error object"));
    }
    let mut wrong: Vec<&str> = Vec::new();
    let access_token = match map.get("access_token") {
        Some(Value::String(t)) if !t.is_empty() => Some(t.clone()),
        None | Some(Value::Null) => {
            wrong.push("access_token (missing)");
            None
        }
        Some(_) => {
            wrong.push("access_token (not a non-empty string)");
            None
        }
    };
    let refresh_token = match map.get("refresh_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if !t.is_empty() => Some(t.clone()),
        Some(_) => {
            wrong.push("refresh_token (not a non-empty string)");
            None
        }
    };
    let expires_in = match map.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)) {
            Some(n) => Some(n),
            None => {
                wrong.push("expires_in (not a number of seconds)");
                None
            }
        },
        Some(Value::String(s)) => match s.trim().parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                wrong.push("expires_in (not a number of seconds)");
                None
            }
        },
        Some(_) => {
            wrong.push("expires_in (not a number of seconds)");
            None
        }
    };
    let scopes = match map.get("scope") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.split_whitespace().map(String::from).collect(),
        // Some endpoints send a list.
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().filter_map(Value::as_str).map(String::from).collect()
        }
        Some(_) => {
            wrong.push("scope (not a string)");
            Vec::new()
        }
    };
    match access_token {
        Some(access_token) if wrong.is_empty() => Ok(TokenAnswer::Tokens(TokenSet {
            access_token,
            refresh_token,
            expires_in: expires_in.map(Duration::from_secs),
            scopes,
            account: map.get("id_token").and_then(Value::as_str).and_then(id_token_account),
        })),
        _ => {
            Err(format!("the token endpoint answered HTTP {status} with fields that do not fit: {}", wrong.join(", ")))
        }
    }
}

/// The account a person signed in with, from the OpenID Connect ID token that came with the
/// tokens: `preferred_username` (Entra), else `upn`, else `email`. The ID token came straight
/// from the token endpoint over TLS, which OpenID Connect Core 3.1.3.7 accepts in place of its
/// signature; it names the account and grants nothing.
pub fn id_token_account(id_token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = id_token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    ["preferred_username", "upn", "email"]
        .iter()
        .filter_map(|k| claims.get(k).and_then(serde_json::Value::as_str))
        .map(|a| crate::reply::sanitize_text(a, 200))
        .find(|a| a.contains('@') && !a.contains(char::is_whitespace))
}

/// POSTs a form to a token endpoint and reads the answer; transport trouble and unreadable
/// answers are [`TokenError::Transient`].
pub async fn token_request(
    http: &reqwest::Client,
    url: &str,
    form: &[(&str, String)],
) -> Result<TokenAnswer, TokenError> {
    let resp = http
        .post(url)
        .header("Accept", "application/json")
        .form(form)
        .send()
        .await
        .map_err(|e| TokenError::Transient(format!("{url}: {}", error_chain(&e))))?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.map_err(|e| TokenError::Transient(format!("{url}: {}", error_chain(&e))))?;
    parse_token_response(status, &body).map_err(TokenError::Transient)
}

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

/// A token request with the provider's client authentication in the body (RFC 6749 2.3.1):
/// `client_id`, and `client_secret` when there is one.
pub async fn client_token_request(
    http: &reqwest::Client,
    p: &ProviderInfo,
    mut form: Vec<(&str, String)>,
) -> Result<TokenSet, TokenError> {
    form.push(("client_id", p.client_id.clone()));
    if let Some(secret) = client_secret(p)? {
        form.push(("client_secret", secret));
    }
    match token_request(http, &p.token_url, &form).await? {
        TokenAnswer::Tokens(set) => Ok(set),
        TokenAnswer::Error { code, description } => Err(classify_response(&code, &description)),
    }
}

/// POSTs a form to a token endpoint and reads a token or an error, without client
/// authentication (the JWT bearer grant carries its own).
pub async fn post_token(http: &reqwest::Client, url: &str, form: &[(&str, &str)]) -> Result<TokenSet, TokenError> {
    let form: Vec<(&str, String)> = form.iter().map(|(k, v)| (*k, v.to_string())).collect();
    match token_request(http, url, &form).await? {
        TokenAnswer::Tokens(set) => Ok(set),
        TokenAnswer::Error { code, description } => Err(classify_response(&code, &description)),
    }
}

#[cfg(test)]
mod tests {

    fn id_token(claims: &str) -> String {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b64(r#"{"alg":"RS256","typ":"JWT"}"#), b64(claims))
    }

    #[test]
    fn the_signed_in_account_comes_from_the_id_token() {
        let t = id_token(r#"{"preferred_username":"alice@contoso.com","upn":"x@y","email":"z@w"}"#);
        assert_eq!(id_token_account(&t).as_deref(), Some("alice@contoso.com"));
        assert_eq!(id_token_account(&id_token(r#"{"upn":"bob@contoso.com"}"#)).as_deref(), Some("bob@contoso.com"));
        assert_eq!(id_token_account(&id_token(r#"{"email":"carol@gmail.com"}"#)).as_deref(), Some("carol@gmail.com"));
        // Not an address, or not a JWT: no account.
        assert_eq!(id_token_account(&id_token(r#"{"preferred_username":"Alice Smith"}"#)), None);
        assert_eq!(id_token_account("not a jwt"), None);
        assert_eq!(id_token_account("a.!!!.c"), None);
        let body = format!(r#"{{"access_token":"at","expires_in":3600,"id_token":"{t}"}}"#);
        assert!(matches!(
            parse_token_response(200, body.as_bytes()),
            Ok(TokenAnswer::Tokens(TokenSet { account: Some(ref a), .. })) if a == "alice@contoso.com"
        ));
    }

    use super::*;

    const AT: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOi-secret-access";
    const RT: &str = "0.AXkA-secret-refresh";

    fn tokens(body: &str) -> TokenSet {
        match parse_token_response(200, body.as_bytes()) {
            Ok(TokenAnswer::Tokens(t)) => t,
            Ok(TokenAnswer::Error { code, .. }) => panic!("error {code}"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn expires_in_as_a_string_is_accepted() {
        let t = tokens(&format!(
            r#"{{"token_type":"Bearer","access_token":"{AT}","refresh_token":"{RT}","expires_in":"3600","scope":"a b"}}"#
        ));
        assert_eq!(t.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!((t.access_token.as_str(), t.refresh_token.as_deref()), (AT, Some(RT)));
        assert_eq!(t.scopes, vec!["a", "b"]);
        let t = tokens(&format!(r#"{{"access_token":"{AT}","expires_in":3599}}"#));
        assert_eq!((t.expires_in, t.refresh_token), (Some(Duration::from_secs(3599)), None));
        // No token_type (the oauth2 crate insists on one): still tokens.
        assert_eq!(tokens(&format!(r#"{{"access_token":"{AT}"}}"#)).expires_in, None);
    }

    #[test]
    fn a_bad_answer_names_fields_and_never_echoes_values() {
        let body = format!(r#"{{"access_token":"{AT}","refresh_token":"{RT}","expires_in":"soon","scope":7}}"#);
        let e = match parse_token_response(200, body.as_bytes()) {
            Err(e) => e,
            Ok(_) => panic!("accepted"),
        };
        assert!(e.contains("expires_in") && e.contains("scope"), "{e}");
        assert!(!e.contains("secret") && !e.contains("soon") && !e.contains("eyJ"), "{e}");
        let e = match parse_token_response(200, format!(r#"{{"refresh_token":"{RT}","access_token":5}}"#).as_bytes()) {
            Err(e) => e,
            Ok(_) => panic!("accepted"),
        };
        assert!(e.contains("access_token") && !e.contains("secret"), "{e}");
        // Not JSON at all (a proxy's page, a truncated answer): only its size.
        let raw = format!("<html>access_token={AT}</html>");
        let e = match parse_token_response(502, raw.as_bytes()) {
            Err(e) => e,
            Ok(_) => panic!("accepted"),
        };
        assert!(e.contains("HTTP 502") && !e.contains("secret") && !e.contains("html"), "{e}");
        // Tokens with a failure status are no tokens; nothing of them is shown either.
        let e = match parse_token_response(500, format!(r#"{{"access_token":"{AT}"}}"#).as_bytes()) {
            Err(e) => e,
            Ok(_) => panic!("accepted"),
        };
        assert!(e.contains("HTTP 500") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn error_objects_are_read() {
        let a = parse_token_response(400, br#"{"error":"invalid_grant","error_description":"AADSTS50173: revoked"}"#);
        assert!(
            matches!(a, Ok(TokenAnswer::Error { ref code, ref description }) if code == "invalid_grant" && description.contains("AADSTS50173")),
            "{}",
            a.err().unwrap_or_default()
        );
    }
}
