//! Grants that need no person: client credentials (secret or certificate assertion) and the
//! Google service-account JWT bearer grant. The interactive sign-ins live in [`super::login`].

use std::time::Duration;

use oauth2::{AuthType, ClientId, ClientSecret, Scope, TokenUrl};
use serde::Deserialize;

use super::jwt::Signer;
use super::provider::ProviderInfo;
use super::tokens::{classify_error, classify_response, Slot, TokenError, TokenSet};

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

/// RFC 6749 4.4: app-only tokens with a client secret or a certificate assertion.
pub async fn client_credentials(http: &reqwest::Client, slot: &Slot) -> Result<TokenSet, TokenError> {
    let p = &slot.provider;
    let client = oauth2::basic::BasicClient::new(ClientId::new(p.client_id.clone()))
        .set_auth_type(AuthType::RequestBody)
        .set_token_uri(TokenUrl::new(p.token_url.clone()).map_err(|e| TokenError::Config(e.to_string()))?);
    let assertion = client_assertion(p)?;
    let client = match client_secret(p)? {
        Some(secret) => client.set_client_secret(ClientSecret::new(secret)),
        None if assertion.is_some() => client,
        None => {
            return Err(TokenError::Config(format!(
                "provider \"{}\" has no client secret or certificate for app-only sign-in",
                p.name
            )))
        }
    };
    let mut req = client.exchange_client_credentials().add_scopes(slot.scopes.iter().cloned().map(Scope::new));
    if let Some(a) = assertion {
        req = req.add_extra_param("client_assertion_type", ASSERTION_TYPE).add_extra_param("client_assertion", a);
    }
    let resp = req.request_async(http).await.map_err(classify_error)?;
    let mut set = TokenSet::from(&resp);
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

/// RFC 7523 2.1: a service account acting as the identity's user (domain-wide delegation).
pub async fn service_account(http: &reqwest::Client, slot: &Slot) -> Result<TokenSet, TokenError> {
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
        "scope": slot.scopes.join(" "),
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

/// The JSON of a token endpoint answer (RFC 6749 5.1 and 5.2).
#[derive(Deserialize)]
struct RawTokenResponse {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    scope: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// POSTs a form to a token endpoint and reads a token or an error, for grants the oauth2
/// crate does not cover.
pub async fn post_token(http: &reqwest::Client, url: &str, form: &[(&str, &str)]) -> Result<TokenSet, TokenError> {
    let resp = http
        .post(url)
        .header("Accept", "application/json")
        .form(form)
        .send()
        .await
        .map_err(|e| TokenError::Transient(format!("{url}: {e}")))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| TokenError::Transient(format!("{url}: {e}")))?;
    let raw: RawTokenResponse = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(_) => {
            return Err(TokenError::Transient(format!(
                "{url} answered HTTP {status}: {}",
                crate::smtp::reply::sanitize_text(&String::from_utf8_lossy(&body), 200)
            )))
        }
    };
    if let Some(err) = raw.error {
        return Err(classify_response(&err, raw.error_description.as_deref().unwrap_or("")));
    }
    let access_token = raw
        .access_token
        .ok_or_else(|| TokenError::Transient(format!("{url} answered HTTP {status} without an access token")))?;
    let expires_in = match raw.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    Ok(TokenSet {
        access_token,
        refresh_token: raw.refresh_token,
        expires_in: expires_in.map(Duration::from_secs),
        scopes: raw.scope.map(|s| s.split_whitespace().map(String::from).collect()).unwrap_or_default(),
        account: None,
    })
}
