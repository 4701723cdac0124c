//! Interactive sign-in: the device authorization grant (RFC 8628) and the authorization code
//! grant with PKCE (RFC 7636), and the bookkeeping that lets `mfd-relay auth login` drive them
//! either in the running daemon (through the admin listener, whose `/oauth/callback` receives
//! the browser's redirect) or in the CLI itself when the daemon is stopped.
//!
//! App-only identities (client credentials, service accounts) need no person: "login" just
//! fetches a first token, which proves the app registration works.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oauth2::basic::BasicClient;
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, DeviceAuthorizationUrl, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope, StandardDeviceAuthorizationResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};

use super::provider::ProviderInfo;
use super::tokens::{classify_error, Slot, TokenError, TokenManager, TokenSet};
use crate::config::{Flow, ProviderKind};

/// What the person must do to sign in, as shown by `mfd-relay auth login`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "flow", rename_all = "snake_case")]
pub enum LoginStart {
    /// Open `verification_uri` anywhere and enter `user_code`.
    DeviceCode { verification_uri: String, user_code: String, expires_in: u64 },
    /// Open `url` in a browser; the provider redirects to `redirect_uri`.
    AuthCode { url: String, redirect_uri: String },
    /// Nothing to do: an app-only identity got its token.
    Done { account: String },
}

/// Where a sign-in stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LoginStatus {
    Pending,
    Done {
        account: String,
    },
    Failed {
        error: String,
    },
    /// No sign-in was started for this identity.
    None,
}

/// An authorization-code sign-in waiting for its redirect.
struct PendingCode {
    identity: String,
    verifier: String,
    redirect_uri: String,
}

/// Sign-ins in progress, by identity.
#[derive(Default)]
pub struct Logins {
    status: Mutex<HashMap<String, LoginStatus>>,
    /// Authorization-code sign-ins by their `state` parameter.
    codes: Mutex<HashMap<String, PendingCode>>,
}

fn client(
    p: &ProviderInfo,
) -> Result<
    BasicClient<
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointSet,
    >,
    TokenError,
> {
    let c = BasicClient::new(ClientId::new(p.client_id.clone()))
        .set_auth_type(oauth2::AuthType::RequestBody)
        .set_token_uri(TokenUrl::new(p.token_url.clone()).map_err(|e| TokenError::Config(format!("token_url: {e}")))?);
    Ok(match super::flows::client_secret(p)? {
        Some(s) => c.set_client_secret(ClientSecret::new(s)),
        None => c,
    })
}

impl Logins {
    pub fn status(&self, identity: &str) -> LoginStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).get(identity).cloned().unwrap_or(LoginStatus::None)
    }

    fn set(&self, identity: &str, s: LoginStatus) {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).insert(identity.to_string(), s);
    }

    /// Starts a sign-in for `identity`. `redirect_uri` is where the browser comes back for
    /// the authorization code flow. Device-code sign-ins are then polled in the background.
    pub async fn start(
        self: &Arc<Self>,
        tokens: &Arc<TokenManager>,
        identity: &str,
        redirect_uri: &str,
    ) -> Result<LoginStart, TokenError> {
        let slot = tokens.slot(identity)?.clone();
        match slot.flow {
            Flow::ClientCredentials | Flow::ServiceAccount => {
                let t = tokens.refresh_now(identity).await?;
                self.set(identity, LoginStatus::Done { account: t.account.clone() });
                Ok(LoginStart::Done { account: t.account })
            }
            Flow::DeviceCode => {
                let details = device_authorize(tokens.http(), &slot).await?;
                let start = LoginStart::DeviceCode {
                    verification_uri: details.verification_uri().to_string(),
                    user_code: details.user_code().secret().clone(),
                    expires_in: details.expires_in().as_secs(),
                };
                self.set(identity, LoginStatus::Pending);
                let (me, tokens, name) = (self.clone(), tokens.clone(), identity.to_string());
                tokio::spawn(async move {
                    let result = device_poll(tokens.http(), &slot, &details).await;
                    me.finish(&tokens, &name, result).await;
                });
                Ok(start)
            }
            Flow::AuthCode => {
                let (url, state, verifier) = authorize_url(&slot, redirect_uri)?;
                self.codes.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    state,
                    PendingCode { identity: identity.to_string(), verifier, redirect_uri: redirect_uri.to_string() },
                );
                self.set(identity, LoginStatus::Pending);
                Ok(LoginStart::AuthCode { url, redirect_uri: redirect_uri.to_string() })
            }
        }
    }

    /// The browser came back with `code` and `state` (or with an error).
    pub async fn callback(&self, tokens: &TokenManager, query: &HashMap<String, String>) -> Result<String, String> {
        let state = query.get("state").cloned().unwrap_or_default();
        let pending = self.codes.lock().unwrap_or_else(|e| e.into_inner()).remove(&state);
        let Some(pending) = pending else {
            return Err(
                "unknown or already used sign-in (the state parameter does not match a sign-in in progress)".into()
            );
        };
        let result = match (query.get("code"), query.get("error")) {
            (Some(code), _) => match tokens.slot(&pending.identity) {
                Ok(slot) => exchange_code(tokens.http(), slot, code, &pending.verifier, &pending.redirect_uri).await,
                Err(e) => Err(e),
            },
            (None, Some(err)) => Err(TokenError::NeedsLogin(format!(
                "{err}: {}",
                query.get("error_description").map(String::as_str).unwrap_or("the sign-in was not completed")
            ))),
            (None, None) => Err(TokenError::NeedsLogin("the redirect carried no code".into())),
        };
        let identity = pending.identity.clone();
        self.finish(tokens, &identity, result).await;
        match self.status(&identity) {
            LoginStatus::Done { account } => Ok(format!("identity \"{identity}\" signed in as {account}")),
            LoginStatus::Failed { error } => Err(error),
            _ => Err("sign-in did not complete".into()),
        }
    }

    /// Completes an authorization-code sign-in from the URL the browser was redirected to
    /// (pasted by the admin when the browser runs on another machine).
    pub async fn complete_with_url(&self, tokens: &TokenManager, redirected: &str) -> Result<String, String> {
        let query = redirected.split_once('?').map(|(_, q)| q).unwrap_or(redirected);
        let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        self.callback(tokens, &params).await
    }

    async fn finish(&self, tokens: &TokenManager, identity: &str, result: Result<TokenSet, TokenError>) {
        let status = match result {
            Ok(set) => match tokens.slot(identity) {
                Ok(slot) => match tokens.save(slot, set).await {
                    Ok(t) => LoginStatus::Done { account: t.account },
                    Err(e) => LoginStatus::Failed { error: e.to_string() },
                },
                Err(e) => LoginStatus::Failed { error: e.to_string() },
            },
            Err(e) => LoginStatus::Failed { error: e.to_string() },
        };
        match &status {
            LoginStatus::Done { account } => tracing::info!(identity, account = %account, "signed in"),
            LoginStatus::Failed { error } => tracing::warn!(identity, "sign-in failed: {error}"),
            _ => {}
        }
        self.set(identity, status);
    }
}

/// RFC 8628 3.1: asks for a device code and a user code.
async fn device_authorize(
    http: &reqwest::Client,
    slot: &Slot,
) -> Result<StandardDeviceAuthorizationResponse, TokenError> {
    let p = &slot.provider;
    let url = p
        .device_url
        .clone()
        .ok_or_else(|| TokenError::Config(format!("provider \"{}\" has no device_authorization_url", p.name)))?;
    let c = client(p)?.set_device_authorization_url(
        DeviceAuthorizationUrl::new(url).map_err(|e| TokenError::Config(format!("device_authorization_url: {e}")))?,
    );
    c.exchange_device_code().add_scopes(slot.scopes.iter().cloned().map(Scope::new)).request_async(http).await.map_err(
        |e| match e {
            RequestTokenError::ServerResponse(r) => super::tokens::classify_response(
                r.error().as_ref(),
                r.error_description().map(String::as_str).unwrap_or(""),
            ),
            other => classify_error::<_>(map_other(other)),
        },
    )
}

/// Turns a device-flow request error without a server response into the basic error type.
fn map_other<RE: std::error::Error + 'static, T: oauth2::ErrorResponse + 'static>(
    e: RequestTokenError<RE, T>,
) -> RequestTokenError<RE, oauth2::basic::BasicErrorResponse> {
    match e {
        RequestTokenError::Request(r) => RequestTokenError::Request(r),
        RequestTokenError::Parse(p, b) => RequestTokenError::Parse(p, b),
        RequestTokenError::Other(s) => RequestTokenError::Other(s),
        RequestTokenError::ServerResponse(_) => RequestTokenError::Other("error response".into()),
    }
}

/// RFC 8628 3.4/3.5: polls until the person approves, denies, or the code expires; honours
/// `slow_down` (the oauth2 crate adds 5 seconds to the interval).
async fn device_poll(
    http: &reqwest::Client,
    slot: &Slot,
    details: &StandardDeviceAuthorizationResponse,
) -> Result<TokenSet, TokenError> {
    let c = client(&slot.provider)?;
    let resp = c
        .exchange_device_access_token(details)
        .request_async(http, tokio::time::sleep, Some(details.expires_in().max(Duration::from_secs(60))))
        .await
        .map_err(|e| match e {
            RequestTokenError::ServerResponse(r) => {
                use oauth2::DeviceCodeErrorResponseType as T;
                let desc = r.error_description().cloned().unwrap_or_default();
                match r.error() {
                    T::AccessDenied => TokenError::NeedsLogin(format!(
                        "the sign-in was declined ({})",
                        desc.lines().next().unwrap_or("")
                    )),
                    T::ExpiredToken => TokenError::NeedsLogin(
                        "the code expired before anyone signed in; run `mfd-relay auth login` again".into(),
                    ),
                    other => super::tokens::classify_response(other.as_ref(), &desc),
                }
            }
            RequestTokenError::Other(s) if s.contains("timed out") || s.contains("Timeout") => TokenError::NeedsLogin(
                "the code expired before anyone signed in; run `mfd-relay auth login` again".into(),
            ),
            other => classify_error(map_other(other)),
        })?;
    Ok(TokenSet::from(&resp))
}

/// RFC 6749 4.1.1 with RFC 7636: the authorization URL, its `state`, and the PKCE verifier.
pub fn authorize_url(slot: &Slot, redirect_uri: &str) -> Result<(String, String, String), TokenError> {
    let p = &slot.provider;
    let auth = p
        .authorize_url
        .clone()
        .ok_or_else(|| TokenError::Config(format!("provider \"{}\" has no authorization_url", p.name)))?;
    let c = client(p)?
        .set_auth_uri(AuthUrl::new(auth).map_err(|e| TokenError::Config(format!("authorization_url: {e}")))?)
        .set_redirect_uri(
            RedirectUrl::new(redirect_uri.to_string()).map_err(|e| TokenError::Config(format!("redirect URI: {e}")))?,
        );
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut req = c
        .authorize_url(CsrfToken::new_random)
        .add_scopes(slot.scopes.iter().cloned().map(Scope::new))
        .set_pkce_challenge(challenge)
        .add_extra_param("login_hint", slot.email.clone());
    if p.kind == ProviderKind::Google {
        // Google gives a refresh token only for offline access, and again only with consent.
        req = req.add_extra_param("access_type", "offline").add_extra_param("prompt", "consent");
    }
    let (url, state) = req.url();
    Ok((url.to_string(), state.secret().clone(), verifier.secret().clone()))
}

/// RFC 6749 4.1.3: exchanges the code (with the PKCE verifier) for tokens.
async fn exchange_code(
    http: &reqwest::Client,
    slot: &Slot,
    code: &str,
    verifier: &str,
    redirect_uri: &str,
) -> Result<TokenSet, TokenError> {
    let c = client(&slot.provider)?.set_redirect_uri(
        RedirectUrl::new(redirect_uri.to_string()).map_err(|e| TokenError::Config(format!("redirect URI: {e}")))?,
    );
    let resp = c
        .exchange_code(AuthorizationCode::new(code.to_string()))
        .set_pkce_verifier(PkceCodeVerifier::new(verifier.to_string()))
        .request_async(http)
        .await
        .map_err(classify_error)?;
    let set = TokenSet::from(&resp);
    if set.refresh_token.is_none() {
        return Err(TokenError::NeedsLogin(
            "the provider gave no refresh token (Microsoft: add the offline_access scope; Google: remove the app's access at myaccount.google.com/permissions and sign in again)".into(),
        ));
    }
    Ok(set)
}
