//! Interactive sign-in: the device authorization grant (RFC 8628) and the authorization code
//! grant with PKCE (RFC 7636), and the bookkeeping that lets `mfd-relay auth login` drive them
//! either in the running daemon (through the admin listener, whose `/oauth/callback` receives
//! the browser's redirect) or in the CLI itself when the daemon is stopped.
//!
//! A sign-in asks consent for every resource the identity needs at once (Graph and the mail
//! servers: [`super::provider::ProviderInfo::sign_in_scopes`]); the token it returns is for
//! the first, the identity's sign-in resource, and the token manager fetches the others from
//! the new refresh token, one resource per request.
//!
//! App-only identities (client credentials, service accounts) need no person: "login" just
//! fetches a first token per resource, which proves the app registration works.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oauth2::basic::BasicClient;
use oauth2::{
    AuthUrl, ClientId, ClientSecret, CsrfToken, DeviceAuthorizationUrl, PkceCodeChallenge, RedirectUrl,
    RequestTokenError, Scope, StandardDeviceAuthorizationResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};

use super::provider::ProviderInfo;
use super::tokens::{classify_error, Slot, TokenError, TokenManager, TokenSet};
use crate::config::{Flow, ProviderKind};
use crate::locks::{MutexExt, RwLockExt};

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
    /// When the sign-in started.
    started: std::time::Instant,
}

/// How long a `state` stays good: a person signs in within minutes; an old state found in
/// a browser history must not complete a sign-in days later.
pub const STATE_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Authorization-code sign-ins waiting at most; beyond that the oldest is dropped, so that
/// repeated `auth login` calls (or a script) cannot grow the map without bound.
pub const MAX_PENDING: usize = 64;

/// The authorization-code sign-ins waiting for their redirect, by `state` (RFC 6749 10.12).
#[derive(Default)]
struct PendingCodes {
    map: HashMap<String, PendingCode>,
}

impl PendingCodes {
    /// Adds a sign-in; drops expired ones, then the oldest while there are too many.
    fn insert(&mut self, state: String, pending: PendingCode, now: std::time::Instant) {
        self.map.retain(|_, p| now.saturating_duration_since(p.started) < STATE_LIFETIME);
        while self.map.len() >= MAX_PENDING {
            let Some(oldest) = self.map.iter().min_by_key(|(_, p)| p.started).map(|(k, _)| k.clone()) else { break };
            if let Some(p) = self.map.remove(&oldest) {
                tracing::warn!(identity = %p.identity, "too many sign-ins waiting: the oldest one was dropped");
            }
        }
        self.map.insert(state, pending);
    }

    /// Takes the sign-in of `state` (once), unless it has expired.
    fn take(&mut self, state: &str, now: std::time::Instant) -> Result<PendingCode, &'static str> {
        match self.map.remove(state) {
            Some(p) if now.saturating_duration_since(p.started) < STATE_LIFETIME => Ok(p),
            Some(_) => Err(
                "this sign-in has expired (it was started more than 10 minutes ago); run `mfd-relay auth login` again",
            ),
            None => Err("unknown or already used sign-in (the state parameter does not match a sign-in in progress)"),
        }
    }
}

/// Sign-ins in progress, by identity.
#[derive(Default)]
pub struct Logins {
    status: Mutex<HashMap<String, LoginStatus>>,
    /// Authorization-code sign-ins by their `state` parameter.
    codes: Mutex<PendingCodes>,
    /// Reads the running configuration's token manager: a sign-in that outlives a reload is
    /// saved there, not into the manager it started with (whose slot the reload may have
    /// replaced). Unset in a process that never reloads (the offline CLI).
    current: std::sync::RwLock<Option<CurrentTokens>>,
}

/// Reads the current token manager (the wiring reads its generation channel).
type CurrentTokens = Arc<dyn Fn() -> Arc<TokenManager> + Send + Sync>;

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
        self.status.locked().get(identity).cloned().unwrap_or(LoginStatus::None)
    }

    /// Saves finished sign-ins into the token manager `current` returns at that time (the
    /// current configuration generation's; ARCHITECTURE.md, "Reload").
    pub fn follow(&self, current: impl Fn() -> Arc<TokenManager> + Send + Sync + 'static) {
        *self.current.write_locked() = Some(Arc::new(current));
    }

    fn set(&self, identity: &str, s: LoginStatus) {
        self.status.locked().insert(identity.to_string(), s);
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
                    me.finish(&tokens, &name, Some(&slot), result).await;
                });
                Ok(start)
            }
            Flow::AuthCode => {
                let (url, state, verifier) = authorize_url(&slot, redirect_uri)?;
                self.codes.locked().insert(
                    state,
                    PendingCode {
                        identity: identity.to_string(),
                        verifier,
                        redirect_uri: redirect_uri.to_string(),
                        started: std::time::Instant::now(),
                    },
                    std::time::Instant::now(),
                );
                self.set(identity, LoginStatus::Pending);
                Ok(LoginStart::AuthCode { url, redirect_uri: redirect_uri.to_string() })
            }
        }
    }

    /// The browser came back with `code` and `state` (or with an error).
    pub async fn callback(&self, tokens: &TokenManager, query: &HashMap<String, String>) -> Result<String, String> {
        self.callback_of(tokens, query).await.1
    }

    /// [`Logins::callback`], with the identity the `state` belonged to (`None` when the
    /// state is unknown or expired), so that the status page can show that identity's result.
    pub async fn callback_of(
        &self,
        tokens: &TokenManager,
        query: &HashMap<String, String>,
    ) -> (Option<String>, Result<String, String>) {
        let state = query.get("state").cloned().unwrap_or_default();
        let pending = self.codes.locked().take(&state, std::time::Instant::now());
        let pending = match pending {
            Ok(p) => p,
            Err(e) => return (None, Err(e.to_string())),
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
        self.finish(tokens, &identity, None, result).await;
        let outcome = match self.status(&identity) {
            LoginStatus::Done { account } => Ok(format!("identity \"{identity}\" signed in as {account}")),
            LoginStatus::Failed { error } => Err(error),
            _ => Err("sign-in did not complete".into()),
        };
        (Some(identity), outcome)
    }

    /// Completes an authorization-code sign-in from the URL the browser was redirected to
    /// (pasted by the admin when the browser runs on another machine).
    pub async fn complete_with_url(&self, tokens: &TokenManager, redirected: &str) -> Result<String, String> {
        let query = redirected.split_once('?').map(|(_, q)| q).unwrap_or(redirected);
        let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        self.callback(tokens, &params).await
    }

    /// Saves a sign-in's tokens into the identity's current slot. `started` is the slot the
    /// sign-in was made for, when a reload may have come in between: its tokens are kept only
    /// when the identity still has the same provider and mailbox.
    async fn finish(
        &self,
        tokens: &TokenManager,
        identity: &str,
        started: Option<&Slot>,
        result: Result<TokenSet, TokenError>,
    ) {
        let current = self.current.read_locked().clone().map(|read| read());
        let tokens = current.as_deref().unwrap_or(tokens);
        let result = match (result, started, tokens.slot(identity)) {
            (Ok(_), Some(old), Ok(now)) if *old.provider != *now.provider || old.email != now.email => {
                Err(TokenError::Config(format!(
                    "identity \"{identity}\" changed (provider or mailbox) while signing in; sign in again"
                )))
            }
            (result, _, _) => result,
        };
        let status = match result {
            Ok(set) => match tokens.slot(identity) {
                Ok(slot) => match tokens.sign_in(slot, set).await {
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
/// `slow_down` (5 seconds more between polls).
async fn device_poll(
    http: &reqwest::Client,
    slot: &Slot,
    details: &StandardDeviceAuthorizationResponse,
) -> Result<TokenSet, TokenError> {
    let expired =
        || TokenError::NeedsLogin("the code expired before anyone signed in; run `mfd-relay auth login` again".into());
    let deadline = tokio::time::Instant::now() + details.expires_in().max(Duration::from_secs(60));
    let mut interval = details.interval().max(Duration::from_secs(1));
    let form =
        || vec![("grant_type", GRANT_DEVICE_CODE.to_string()), ("device_code", details.device_code().secret().clone())];
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() >= deadline {
            return Err(expired());
        }
        match super::flows::client_token_request(http, &slot.provider, form()).await {
            Ok(set) => return Ok(set),
            Err(e) => match device_poll_error(&e) {
                DevicePoll::Wait => {}
                DevicePoll::SlowDown => interval += Duration::from_secs(5),
                DevicePoll::Declined => {
                    let detail = e.to_string();
                    let detail = detail.split_once(": ").map(|(_, d)| d).unwrap_or("");
                    let detail = detail.split_once(": ").map(|(_, d)| d).unwrap_or(detail);
                    return Err(TokenError::NeedsLogin(format!("the sign-in was declined ({detail})")));
                }
                DevicePoll::Expired => return Err(expired()),
                DevicePoll::Fail => return Err(e),
            },
        }
    }
}

/// RFC 8628 3.4 grant type.
const GRANT_DEVICE_CODE: &str = "urn:ietf:params:oauth:grant-type:device_code";

enum DevicePoll {
    Wait,
    SlowDown,
    Declined,
    Expired,
    Fail,
}

/// RFC 8628 3.5: what a polling error means. The error was classified by
/// [`super::tokens::classify_response`], whose text starts with the error code.
fn device_poll_error(e: &TokenError) -> DevicePoll {
    let text = match e {
        TokenError::NeedsLogin(t) | TokenError::Transient(t) => t.as_str(),
        _ => return DevicePoll::Fail,
    };
    let code = text.split(':').next().unwrap_or("").trim();
    match code {
        "authorization_pending" => DevicePoll::Wait,
        "slow_down" => DevicePoll::SlowDown,
        "access_denied" => DevicePoll::Declined,
        "expired_token" => DevicePoll::Expired,
        _ => DevicePoll::Fail,
    }
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

/// The scope of an authorization code's redemption. The sign-in asked consent for every
/// resource at once; Entra redeems a code for one resource's token only (several in one
/// token request: AADSTS28000), so a Microsoft identity names its sign-in resource's scopes
/// and the OpenID ones. Other providers take no scope there.
fn redemption_scope(slot: &Slot) -> Option<String> {
    if slot.provider.kind != ProviderKind::Microsoft || slot.provider.scopes.is_some() {
        return None;
    }
    let mut v: Vec<&str> = slot.scopes_for(slot.sign_in_resource()).iter().map(String::as_str).collect();
    for s in ["openid", "profile"] {
        if slot.scopes.iter().any(|x| x == s) && !v.contains(&s) {
            v.push(s);
        }
    }
    (!v.is_empty()).then(|| v.join(" "))
}

/// RFC 6749 4.1.3: exchanges the code (with the PKCE verifier) for tokens.
async fn exchange_code(
    http: &reqwest::Client,
    slot: &Slot,
    code: &str,
    verifier: &str,
    redirect_uri: &str,
) -> Result<TokenSet, TokenError> {
    let mut form = vec![
        ("grant_type", "authorization_code".to_string()),
        ("code", code.to_string()),
        ("redirect_uri", redirect_uri.to_string()),
        ("code_verifier", verifier.to_string()),
    ];
    if let Some(scope) = redemption_scope(slot) {
        form.push(("scope", scope));
    }
    let set = super::flows::client_token_request(http, &slot.provider, form).await?;
    if set.refresh_token.is_none() {
        return Err(TokenError::NeedsLogin(
            "the provider gave no refresh token (Microsoft: add the offline_access scope; Google: remove the app's access at myaccount.google.com/permissions and sign in again)".into(),
        ));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn pending(identity: &str, started: Instant) -> PendingCode {
        PendingCode {
            identity: identity.into(),
            verifier: "v".into(),
            redirect_uri: "http://localhost/cb".into(),
            started,
        }
    }

    #[test]
    fn states_expire_after_ten_minutes() {
        let t0 = Instant::now();
        let mut codes = PendingCodes::default();
        codes.insert("s1".into(), pending("a", t0), t0);
        codes.insert("s2".into(), pending("b", t0), t0);
        let p = codes.take("s1", t0 + Duration::from_secs(9 * 60 + 59));
        assert_eq!(p.map(|p| p.identity).ok().as_deref(), Some("a"));
        assert!(codes.take("s1", t0).is_err(), "a state is good once");
        let e = codes.take("s2", t0 + STATE_LIFETIME).err().unwrap_or_default();
        assert!(e.contains("expired"), "{e}");
        assert!(codes.take("nope", t0).err().unwrap_or_default().contains("unknown"));
    }

    #[test]
    fn pending_sign_ins_are_bounded_and_the_oldest_goes() {
        let t0 = Instant::now();
        let mut codes = PendingCodes::default();
        for i in 0..MAX_PENDING + 10 {
            let t = t0 + Duration::from_millis(i as u64);
            codes.insert(format!("s{i}"), pending(&format!("id{i}"), t), t);
        }
        assert_eq!(codes.map.len(), MAX_PENDING);
        let late = t0 + Duration::from_secs(1);
        assert!(codes.take("s0", late).is_err(), "the oldest were dropped");
        assert!(codes.take("s9", late).is_err());
        assert!(codes.take("s10", late).is_ok());
        assert!(codes.take(&format!("s{}", MAX_PENDING + 9), late).is_ok());
        // Expired ones leave at the next insert.
        let later = t0 + STATE_LIFETIME + Duration::from_secs(5);
        codes.insert("new".into(), pending("n", later), later);
        assert_eq!(codes.map.len(), 1);
    }
}
