//! A fake OAuth 2.0 provider for integration tests.
//!
//! It plays the Microsoft identity platform v2.0 (Entra ID) token, device-code
//! and authorisation endpoints, plus Google's JWT bearer grant for Workspace
//! service accounts, on `127.0.0.1:<random port>`. Errors come back the way
//! Entra sends them: HTTP 400 (401 for client authentication failures) with
//! `{"error": "...", "error_description": "AADSTS<n>: ...", "error_codes": [n]}`
//! (RFC 6749 §5.2). Google-only paths (JWT bearer, device-flow scope refusal)
//! answer Google-style, without `error_codes`.
//!
//! Endpoints (each also under `/{tenant}/oauth2/v2.0/...`, the Microsoft shape):
//! - `POST /token`: grants `client_credentials` (secret or RS256 client
//!   assertion, RFC 7523 §2.2), `refresh_token`, `device_code` (RFC 8628),
//!   `authorization_code` with PKCE (RFC 7636), and
//!   `urn:ietf:params:oauth:grant-type:jwt-bearer` (RFC 7523 §2.1).
//!   Client secrets are taken from the form or from HTTP Basic auth
//!   (RFC 6749 §2.3.1, what the `oauth2` crate sends by default).
//! - `POST /devicecode`: starts a device authorisation (RFC 8628 §3.1-3.2).
//! - `GET /authorize`: the user "signs in" at once as the configured account and
//!   the browser is sent a 302 to `redirect_uri?code=..&state=..` (RFC 6749 §4.1.2).
//! - `GET|POST /introspect`: RFC 7662-style introspection for Dovecot's
//!   `passdb oauth2` (`?token=`, form `token=`, or `Authorization: Bearer`).
//!
//! All state sits behind one mutex shared by the server and the [`FakeOAuth`]
//! handle, so a test can change behaviour (revoke, go down, approve a device
//! code) and inspect what happened (counters, requests) at any moment.
//!
//! Resources, as Entra has them: an access token is for one resource (the scheme and host
//! of its scopes: `https://outlook.office.com`, `https://graph.microsoft.com`; a scope
//! without one is Graph's). `/devicecode` and `/authorize` take consent for several
//! resources at once and the token they lead to is for the first one named; the refresh
//! token covers every consented scope. A token request (`refresh_token`,
//! `client_credentials`, `authorization_code` with `scope`) whose scopes span several
//! resources is refused with `AADSTS28000` (`invalid_scope`). Google's scopes are one
//! resource. [`FakeOAuth::bearer_validator`] accepts a resource's tokens only, and
//! [`FakeOAuth::token_validator`] (the mail servers) refuses Graph's and `gmail.send`-only
//! tokens.
//!
//! Tokens are random strings tied to an account e-mail and an expiry:
//! access tokens start with `fake-at-`, refresh tokens with `fake-rt-`, so a
//! test can grep logs for leaks.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{RawQuery, State as AxState};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::fake_smtp::TokenValidator;
use super::ServerTask;
use super::{b64url, random_b64url, sha256, unix_now};

/// RFC 8628 §3.4 grant type.
pub const GRANT_DEVICE_CODE: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// RFC 7523 §2.1 grant type (Google service accounts).
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 7523 §2.2 client assertion type (Microsoft certificate credentials).
pub const CLIENT_ASSERTION_TYPE_JWT: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Microsoft delegated scopes and the app-only scope, Google's Gmail scope.
pub const MS_SMTP_SCOPE: &str = "https://outlook.office.com/SMTP.Send";
pub const MS_APP_SCOPE: &str = "https://outlook.office365.com/.default";
pub const GOOGLE_MAIL_SCOPE: &str = "https://mail.google.com/";
/// Google's send-only scope (the Gmail API).
pub const GOOGLE_SEND_SCOPE: &str = "https://www.googleapis.com/auth/gmail.send";
/// Microsoft Graph's resource identifier (global cloud).
pub const GRAPH_RESOURCE: &str = "https://graph.microsoft.com";

/// Access tokens live one hour unless a test says otherwise.
pub const DEFAULT_ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Microsoft device codes live 15 minutes.
pub const DEFAULT_DEVICE_CODE_LIFETIME: Duration = Duration::from_secs(900);
/// Poll interval announced for device codes. Entra says 5; tests want speed.
pub const DEFAULT_DEVICE_POLL_INTERVAL_SECS: u64 = 1;
/// RFC 8628 §3.5: after `slow_down` the interval grows by 5 seconds.
const SLOW_DOWN_INCREMENT_SECS: u64 = 5;
/// Authorisation codes are good for 10 minutes (RFC 6749 §4.1.2 recommends ≤ 10).
const AUTH_CODE_LIFETIME: Duration = Duration::from_secs(600);
/// Clock skew allowed on JWT `nbf` / `iat`.
const JWT_SKEW_SECS: u64 = 300;
/// Google refuses service-account assertions living longer than an hour.
const GOOGLE_MAX_ASSERTION_SECS: u64 = 3600;
/// OpenID Connect scopes that are always grantable.
const OIDC_SCOPES: [&str; 4] = ["openid", "profile", "email", "offline_access"];

/// The grant types the token endpoint knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Grant {
    ClientCredentials,
    RefreshToken,
    DeviceCode,
    AuthorizationCode,
    JwtBearer,
}

impl Grant {
    /// The `grant_type` form value.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::RefreshToken => "refresh_token",
            Grant::DeviceCode => GRANT_DEVICE_CODE,
            Grant::AuthorizationCode => "authorization_code",
            Grant::JwtBearer => GRANT_JWT_BEARER,
        }
    }

    fn parse(s: &str) -> Option<Grant> {
        [Grant::ClientCredentials, Grant::RefreshToken, Grant::DeviceCode, Grant::AuthorizationCode, Grant::JwtBearer]
            .into_iter()
            .find(|g| g.as_str() == s)
    }
}

/// An app registration.
#[derive(Clone, Debug, Default)]
pub struct ClientApp {
    pub client_id: String,
    /// The client secret (`client_secret` form field or HTTP Basic password).
    pub secret: Option<String>,
    /// The secret matches but has expired: `AADSTS7000222`.
    pub secret_expired: bool,
    /// RSA public key (PKCS#1 `RSAPublicKey` DER, see
    /// [`RsaTestKey::public_key_der`](super::RsaTestKey::public_key_der)) that
    /// verifies client assertions.
    pub assertion_key: Option<Vec<u8>>,
    /// If set, the assertion's `x5t#S256` header must equal it.
    pub assertion_x5t_s256: Option<String>,
    /// The mailbox that `client_credentials` tokens of this app act for (the
    /// identity's e-mail). Without it the token belongs to `app:<client_id>`.
    pub app_account: Option<String>,
}

impl ClientApp {
    /// A public client (device code / auth code + PKCE, no secret).
    pub fn public(client_id: &str) -> ClientApp {
        ClientApp { client_id: client_id.to_string(), ..ClientApp::default() }
    }

    /// Sets the client secret.
    pub fn secret(mut self, secret: &str) -> ClientApp {
        self.secret = Some(secret.to_string());
        self
    }

    /// Sets the certificate credential: public key and optional thumbprint.
    pub fn assertion_key(mut self, public_key_der: Vec<u8>, x5t_s256: Option<&str>) -> ClientApp {
        self.assertion_key = Some(public_key_der);
        self.assertion_x5t_s256 = x5t_s256.map(str::to_string);
        self
    }

    /// Sets the mailbox app-only tokens are valid for.
    pub fn app_account(mut self, email: &str) -> ClientApp {
        self.app_account = Some(email.to_string());
        self
    }
}

/// An Entra error code with its description, as in
/// `"error_description": "AADSTS50173: The provided grant has expired ..."`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AadError {
    pub code: u32,
    pub description: String,
}

impl AadError {
    pub fn new(code: u32, description: &str) -> AadError {
        AadError { code, description: description.to_string() }
    }

    /// Password changed / sessions revoked (the default for a revoked refresh token).
    pub fn grant_revoked() -> AadError {
        AadError::new(
            50173,
            "The provided grant has expired due to it being revoked, a fresh auth token is \
             needed. The user might have changed or reset their password.",
        )
    }

    /// Refresh token unused for 90 days.
    pub fn refresh_token_expired() -> AadError {
        AadError::new(
            700082,
            "The refresh token has expired due to inactivity. The token was issued on \
             2026-08-01T00:00:00Z and was inactive for 90.00:00:00.",
        )
    }
}

/// Counters, as a snapshot.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Every `POST /token` by grant type, successful or not.
    pub token_requests: HashMap<Grant, u64>,
    /// Successful `POST /token` by grant type.
    pub tokens_issued: HashMap<Grant, u64>,
    /// `POST /token` whose `grant_type` was missing or unknown.
    pub bad_grant_requests: u64,
    pub devicecode_requests: u64,
    pub authorize_requests: u64,
    pub introspect_requests: u64,
    /// Requests answered 503 because the provider was set down.
    pub refused_while_down: u64,
}

/// One HTTP request the provider saw, with its answer.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// The request path, e.g. `/token` or `/contoso/oauth2/v2.0/token`.
    pub path: String,
    /// The client id from HTTP Basic auth, if the client used it.
    pub basic_auth_client: Option<String>,
    pub status: u16,
    /// The `error` field of an error answer.
    pub error: Option<String>,
    /// `grant_type` of a token request.
    pub grant: Option<String>,
    /// The `scope` parameter, as sent.
    pub scope: Option<String>,
    /// The refresh token a `refresh_token` grant presented.
    pub refresh_token: Option<String>,
    /// The access token and refresh token the answer carried.
    pub issued_access_token: Option<String>,
    pub issued_refresh_token: Option<String>,
}

/// What is known about an access token.
#[derive(Clone, Debug)]
pub struct AccessTokenInfo {
    pub scope: String,
    /// The grant that produced it (`None`: issued directly by the test).
    pub grant: Option<Grant>,
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

struct Settings {
    access_token_lifetime: Duration,
    rotate_refresh_tokens: bool,
    /// `None`: every scope is grantable.
    grantable_scopes: Option<BTreeSet<String>>,
    /// Scopes `/devicecode` refuses with `invalid_scope` (Google and Gmail).
    device_refused_scopes: BTreeSet<String>,
    invalid_grant: AadError,
    require_offline_access: bool,
    require_pkce: bool,
    authorize_account: Option<String>,
    device_interval_secs: u64,
    device_lifetime: Duration,
    forced_slow_downs: u32,
    /// The next refresh-token grants refused whatever the token, with this error.
    passing_refusals: Option<(u32, AadError)>,
    down: bool,
    delay: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            access_token_lifetime: DEFAULT_ACCESS_TOKEN_LIFETIME,
            rotate_refresh_tokens: true,
            grantable_scopes: None,
            device_refused_scopes: BTreeSet::new(),
            invalid_grant: AadError::grant_revoked(),
            require_offline_access: false,
            require_pkce: true,
            authorize_account: None,
            device_interval_secs: DEFAULT_DEVICE_POLL_INTERVAL_SECS,
            device_lifetime: DEFAULT_DEVICE_CODE_LIFETIME,
            forced_slow_downs: 0,
            passing_refusals: None,
            down: false,
            delay: Duration::ZERO,
        }
    }
}

struct AccessRecord {
    account: String,
    client_id: Option<String>,
    scope: String,
    grant: Option<Grant>,
    expires_at: Instant,
    revoked: bool,
}

impl AccessRecord {
    fn live(&self, now: Instant) -> bool {
        !self.revoked && now < self.expires_at
    }
}

struct RefreshRecord {
    account: String,
    /// `None`: usable by any client (issued directly by a test).
    client_id: Option<String>,
    scope: String,
    revoked: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum DeviceState {
    Pending,
    Approved(String),
    Denied,
    Redeemed,
}

struct DeviceAuth {
    device_code: String,
    user_code: String,
    client_id: String,
    scope: String,
    state: DeviceState,
    expires_at: Instant,
    interval_secs: u64,
    last_poll: Option<Instant>,
}

struct AuthCode {
    client_id: String,
    redirect_uri: String,
    challenge: Option<String>,
    scope: String,
    account: String,
    expires_at: Instant,
    used: bool,
}

#[derive(Default)]
struct State {
    settings: Settings,
    clients: HashMap<String, ClientApp>,
    service_accounts: HashMap<String, Vec<u8>>,
    access: HashMap<String, AccessRecord>,
    refresh: HashMap<String, RefreshRecord>,
    devices: Vec<DeviceAuth>,
    codes: HashMap<String, AuthCode>,
    counts: Counts,
    requests: Vec<SeenRequest>,
}

struct Shared {
    state: Mutex<State>,
    base_url: String,
    /// Woken on every new device authorisation.
    changed: Notify,
}

impl Shared {
    /// The state, even if a panicking test thread poisoned the mutex.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// ---------------------------------------------------------------------------
// The handle
// ---------------------------------------------------------------------------

/// Handle on a running fake provider. Cheap to clone; the server stops when
/// the last clone is dropped (or when the test's runtime ends).
#[derive(Clone)]
pub struct FakeOAuth {
    shared: Arc<Shared>,
    _task: Arc<ServerTask>,
}

impl FakeOAuth {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start() -> FakeOAuth {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("FakeOAuth: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            base_url: format!("http://{addr}"),
            changed: Notify::new(),
        });
        let app = Router::new()
            .route("/token", post(token_handler))
            .route("/devicecode", post(devicecode_handler))
            .route("/authorize", get(authorize_handler))
            .route("/{tenant}/oauth2/v2.0/token", post(token_handler))
            .route("/{tenant}/oauth2/v2.0/devicecode", post(devicecode_handler))
            .route("/{tenant}/oauth2/v2.0/authorize", get(authorize_handler))
            .route("/introspect", get(introspect_handler).post(introspect_handler))
            .with_state(shared.clone());
        FakeOAuth { shared, _task: ServerTask::serve(listener, app) }
    }

    /// `{base}/token` (also the `aud` that assertions must carry).
    pub fn token_url(&self) -> String {
        format!("{}/token", self.shared.base_url)
    }

    /// `{base}/devicecode`
    pub fn devicecode_url(&self) -> String {
        format!("{}/devicecode", self.shared.base_url)
    }

    /// `{base}/authorize`
    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.shared.base_url)
    }

    /// `{base}/introspect`; Dovecot: `introspection_url = {base}/introspect?token=`.
    pub fn introspect_url(&self) -> String {
        format!("{}/introspect", self.shared.base_url)
    }

    /// `{base}/{tenant}/oauth2/v2.0/token`: the Microsoft-shaped token URL.
    pub fn microsoft_token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.shared.base_url)
    }

    // --- registration ------------------------------------------------------

    /// Registers (or replaces) an app.
    pub fn register_client(&self, app: ClientApp) {
        self.shared.lock().clients.insert(app.client_id.clone(), app);
    }

    /// Marks an app's secret as expired (`AADSTS7000222`) or valid again.
    pub fn set_client_secret_expired(&self, client_id: &str, expired: bool) {
        let mut st = self.shared.lock();
        let app =
            st.clients.get_mut(client_id).unwrap_or_else(|| panic!("FakeOAuth: no client {client_id:?} registered"));
        app.secret_expired = expired;
    }

    /// Registers a Google service account (its `client_email`) and the RSA
    /// public key (PKCS#1 DER) that verifies its assertions.
    pub fn register_service_account(&self, email: &str, public_key_der: Vec<u8>) {
        self.shared.lock().service_accounts.insert(email.to_string(), public_key_der);
    }

    // --- behaviour ---------------------------------------------------------

    /// Lifetime of new access tokens; `expires_in` is its whole seconds.
    pub fn set_access_token_lifetime(&self, lifetime: Duration) {
        self.shared.lock().settings.access_token_lifetime = lifetime;
    }

    /// Whether a refresh returns a new refresh token (default yes; the old
    /// one stays valid, like Microsoft). Off: no `refresh_token` in the answer.
    pub fn set_rotate_refresh_tokens(&self, rotate: bool) {
        self.shared.lock().settings.rotate_refresh_tokens = rotate;
    }

    /// The scopes this provider grants (OIDC scopes always pass). `None`
    /// (the default) grants everything. Others get `invalid_scope`.
    pub fn set_grantable_scopes(&self, scopes: Option<&[&str]>) {
        self.shared.lock().settings.grantable_scopes = scopes.map(|s| s.iter().map(|x| x.to_string()).collect());
    }

    /// `/devicecode` refuses `scope` with `invalid_scope`, as Google's device
    /// flow refuses `https://mail.google.com/`.
    pub fn refuse_scope_in_device_flow(&self, scope: &str) {
        self.shared.lock().settings.device_refused_scopes.insert(scope.to_string());
    }

    /// The error for a revoked or unknown refresh token (default `AADSTS50173`).
    pub fn set_invalid_grant_error(&self, err: AadError) {
        self.shared.lock().settings.invalid_grant = err;
    }

    /// The next `times` refresh-token grants get `invalid_grant` with `err` although the token
    /// is good (Entra does this now and then and takes it back a minute later).
    pub fn refuse_refreshes(&self, times: u32, err: AadError) {
        self.shared.lock().settings.passing_refusals = Some((times, err));
    }

    /// The account that "signs in" at `/authorize`. `None` (the default): the
    /// user declines and the redirect carries `error=access_denied`.
    pub fn set_authorize_account(&self, email: Option<&str>) {
        self.shared.lock().settings.authorize_account = email.map(str::to_string);
    }

    /// Interval (seconds) announced for new device codes and enforced with
    /// `slow_down`. 0 disables the check until a `slow_down` (forced or not)
    /// raises that code's interval by 5 s, as RFC 8628 §3.5 has it.
    pub fn set_device_poll_interval(&self, secs: u64) {
        self.shared.lock().settings.device_interval_secs = secs;
    }

    /// The next `polls` device-code polls answer `slow_down` whatever their pace.
    pub fn force_slow_down(&self, polls: u32) {
        self.shared.lock().settings.forced_slow_downs = polls;
    }

    /// Down: `/token`, `/devicecode` and `/authorize` answer 503
    /// `temporarily_unavailable` (`AADSTS90033`). `/introspect` keeps working:
    /// it stands for the mail server's view of tokens, not the login service.
    pub fn set_down(&self, down: bool) {
        self.shared.lock().settings.down = down;
    }

    /// Delays each `/token`, `/devicecode` and `/authorize` answer.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().settings.delay = delay;
    }

    // --- device flow -------------------------------------------------------

    /// The user enters `user_code` and signs in as `account_email`.
    pub fn approve_device(&self, user_code: &str, account_email: &str) {
        self.with_device(user_code, |d| d.state = DeviceState::Approved(account_email.to_string()));
    }

    /// The user declines: the next poll gets `access_denied`.
    pub fn deny_device(&self, user_code: &str) {
        self.with_device(user_code, |d| d.state = DeviceState::Denied);
    }

    /// The device code expires now: the next poll gets `expired_token`.
    pub fn expire_device(&self, user_code: &str) {
        self.with_device(user_code, |d| d.expires_at = Instant::now());
    }

    /// User codes of every device authorisation so far, oldest first.
    pub fn user_codes(&self) -> Vec<String> {
        self.shared.lock().devices.iter().map(|d| d.user_code.clone()).collect()
    }

    /// Waits until a device authorisation is pending (not yet approved,
    /// denied or expired) and returns the newest one's user code, as the
    /// person reading it off the screen would. Panics after `timeout`.
    pub async fn wait_for_user_code(&self, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.shared.lock();
                let now = Instant::now();
                if let Some(d) = st.devices.iter().rev().find(|d| d.state == DeviceState::Pending && now < d.expires_at)
                {
                    return d.user_code.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "FakeOAuth: no pending device code within {timeout:?} \
                     ({} /devicecode requests seen)",
                    self.shared.lock().counts.devicecode_requests
                );
            }
        }
    }

    fn with_device(&self, user_code: &str, f: impl FnOnce(&mut DeviceAuth)) {
        let wanted = normalise_user_code(user_code);
        let mut st = self.shared.lock();
        let known: Vec<String> = st.devices.iter().map(|d| d.user_code.clone()).collect();
        match st.devices.iter_mut().find(|d| normalise_user_code(&d.user_code) == wanted) {
            Some(d) => f(d),
            None => panic!("FakeOAuth: no device authorisation with user code {user_code:?} (known: {known:?})"),
        }
    }

    // --- tokens ------------------------------------------------------------

    /// A live access token for `email` (current lifetime), as if granted.
    pub fn issue_access_token(&self, email: &str) -> String {
        let mut st = self.shared.lock();
        let lifetime = st.settings.access_token_lifetime;
        st.new_access_token(email, None, "", None, lifetime)
    }

    /// A refresh token for `email`, accepted from any client.
    pub fn issue_refresh_token(&self, email: &str) -> String {
        self.shared.lock().new_refresh_token(email, None, "")
    }

    /// Whether `token` is a live access token of `email` (case-insensitive).
    /// This is the check an upstream mail server makes.
    pub fn token_is_valid(&self, token: &str, email: &str) -> bool {
        let st = self.shared.lock();
        st.access.get(token).is_some_and(|r| r.live(Instant::now()) && r.account.eq_ignore_ascii_case(email))
    }

    /// [`token_is_valid`](Self::token_is_valid) as a closure for
    /// [`FakeSmtp`](super::fake_smtp::FakeSmtp)'s options.
    pub fn token_validator(&self) -> TokenValidator {
        let shared = self.shared.clone();
        Arc::new(move |user: &str, token: &str| {
            let st = shared.lock();
            st.access.get(token).is_some_and(|r| {
                r.live(Instant::now()) && r.account.eq_ignore_ascii_case(user) && token_fits_mail(&r.scope)
            })
        })
    }

    /// A bearer-token check for a fake HTTP API (Graph, Gmail): the account of a live
    /// access token for `resource` (`https://graph.microsoft.com`; for Google any of its
    /// scopes, e.g. `https://www.googleapis.com/auth/gmail.send`: tokens carrying `gmail.send`
    /// or `https://mail.google.com/`), else `None`. Graph refuses an Outlook token, as the
    /// real one does.
    pub fn bearer_validator(&self, resource: &str) -> super::BearerValidator {
        let shared = self.shared.clone();
        let resource = resource.to_string();
        Arc::new(move |token: &str| {
            let st = shared.lock();
            st.access
                .get(token)
                .filter(|r| r.live(Instant::now()) && token_is_for(&r.scope, &resource))
                .map(|r| r.account.clone())
        })
    }

    /// A live access token for `email` with `scope`, as if granted.
    pub fn issue_access_token_with_scope(&self, email: &str, scope: &str) -> String {
        let mut st = self.shared.lock();
        let lifetime = st.settings.access_token_lifetime;
        st.new_access_token(email, None, scope, None, lifetime)
    }

    /// A refresh token for `email` covering `scope` (a consent), accepted from any client.
    pub fn issue_refresh_token_with_scope(&self, email: &str, scope: &str) -> String {
        self.shared.lock().new_refresh_token(email, None, scope)
    }

    /// Every access token for `resource` expires now; the others are untouched.
    pub fn expire_access_tokens_for(&self, resource: &str) {
        let now = Instant::now();
        for a in self.shared.lock().access.values_mut() {
            if !a.scope.trim().is_empty() && token_is_for(&a.scope, resource) {
                a.expires_at = a.expires_at.min(now);
            }
        }
    }

    /// Revokes one access token (the API it is for then refuses it).
    pub fn revoke_access_token(&self, token: &str) {
        if let Some(a) = self.shared.lock().access.get_mut(token) {
            a.revoked = true;
        }
    }

    /// What is known about an access token, if it was ever issued.
    pub fn access_token_info(&self, token: &str) -> Option<AccessTokenInfo> {
        let st = self.shared.lock();
        st.access.get(token).map(|r| AccessTokenInfo { scope: r.scope.clone(), grant: r.grant })
    }

    /// Whether a refresh token exists and is not revoked.
    pub fn refresh_token_is_valid(&self, token: &str) -> bool {
        self.shared.lock().refresh.get(token).is_some_and(|r| !r.revoked)
    }

    /// Revokes one refresh token: its next use gets `invalid_grant`.
    pub fn revoke_refresh_token(&self, token: &str) {
        if let Some(r) = self.shared.lock().refresh.get_mut(token) {
            r.revoked = true;
        }
    }

    /// Revokes every refresh and access token of `email` (password reset,
    /// "revoke sessions").
    /// Every refresh token issued for `email` (to look for them where they must not be).
    pub fn refresh_tokens_of(&self, email: &str) -> Vec<String> {
        let st = self.shared.lock();
        st.refresh.iter().filter(|(_, r)| r.account.eq_ignore_ascii_case(email)).map(|(t, _)| t.clone()).collect()
    }

    pub fn revoke_account(&self, email: &str) {
        let mut st = self.shared.lock();
        for r in st.refresh.values_mut() {
            if r.account.eq_ignore_ascii_case(email) {
                r.revoked = true;
            }
        }
        for a in st.access.values_mut() {
            if a.account.eq_ignore_ascii_case(email) {
                a.revoked = true;
            }
        }
    }

    /// Every access token issued so far expires now (forces refreshes).
    pub fn expire_access_tokens(&self) {
        let now = Instant::now();
        for a in self.shared.lock().access.values_mut() {
            a.expires_at = a.expires_at.min(now);
        }
    }

    // --- observation -------------------------------------------------------

    pub fn counts(&self) -> Counts {
        self.shared.lock().counts.clone()
    }

    /// `POST /token` requests with this grant (successful or not).
    pub fn token_requests(&self, grant: Grant) -> u64 {
        *self.shared.lock().counts.token_requests.get(&grant).unwrap_or(&0)
    }

    /// Successful `POST /token` requests with this grant.
    pub fn tokens_issued(&self, grant: Grant) -> u64 {
        *self.shared.lock().counts.tokens_issued.get(&grant).unwrap_or(&0)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared.lock().requests.clone()
    }
}

/// An ID token as Entra's v2.0 endpoint shapes it (the relay reads it from the token endpoint
/// over TLS and checks no signature, so this one has none worth checking).
fn id_token(account: &str) -> String {
    let claims = json!({
        "aud": "relay-app",
        "iss": "https://login.microsoftonline.com/fake/v2.0",
        "preferred_username": account,
        "name": "Signed In Person",
        "tid": "fake",
    });
    format!("{}.{}.", b64url(br#"{"alg":"none","typ":"JWT"}"#), b64url(claims.to_string().as_bytes()))
}

fn normalise_user_code(code: &str) -> String {
    code.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_uppercase()).collect()
}

// ---------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------

/// An answer, before it becomes an axum response (and a [`SeenRequest`]).
struct HttpReply {
    status: StatusCode,
    body: Option<Value>,
    location: Option<String>,
}

type Answer = Result<HttpReply, HttpReply>;

impl HttpReply {
    /// Entra's answer to a device code or authorization code used a second time.
    fn already_redeemed() -> HttpReply {
        HttpReply::bad(
            "invalid_grant",
            54005,
            "OAuth2 Authorization code was already redeemed, please retry with a new valid \
             code or use an existing refresh token.",
        )
    }

    fn ok(body: Value) -> HttpReply {
        HttpReply { status: StatusCode::OK, body: Some(body), location: None }
    }

    fn redirect(location: String) -> HttpReply {
        HttpReply { status: StatusCode::FOUND, body: None, location: Some(location) }
    }

    /// An Entra-style error: `AADSTS<code>: <description>` plus `error_codes`.
    fn aad(status: StatusCode, error: &str, code: u32, description: &str) -> HttpReply {
        let trace = random_b64url(12);
        HttpReply {
            status,
            body: Some(json!({
                "error": error,
                "error_description": format!(
                    "AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {trace}"
                ),
                "error_codes": [code],
                "trace_id": trace,
                "correlation_id": trace,
            })),
            location: None,
        }
    }

    /// `400 error` with an Entra code.
    fn bad(error: &str, code: u32, description: &str) -> HttpReply {
        Self::aad(StatusCode::BAD_REQUEST, error, code, description)
    }

    /// `401 invalid_client` with an Entra code.
    fn client(code: u32, description: &str) -> HttpReply {
        Self::aad(StatusCode::UNAUTHORIZED, "invalid_client", code, description)
    }

    /// `400 error` Google-style (no `error_codes`).
    fn google(error: &str, description: &str) -> HttpReply {
        HttpReply {
            status: StatusCode::BAD_REQUEST,
            body: Some(json!({"error": error, "error_description": description})),
            location: None,
        }
    }

    fn missing(name: &str) -> HttpReply {
        Self::bad(
            "invalid_request",
            900144,
            &format!("The request body must contain the following parameter: '{name}'."),
        )
    }

    fn error_field(&self) -> Option<String> {
        self.body.as_ref().and_then(|b| b.get("error")).and_then(Value::as_str).map(str::to_string)
    }
}

impl IntoResponse for HttpReply {
    fn into_response(self) -> Response {
        let mut resp = match self.body {
            Some(b) => (self.status, axum::Json(b)).into_response(),
            None => self.status.into_response(),
        };
        let h = resp.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if let Some(loc) = self.location {
            if let Ok(v) = HeaderValue::from_str(&loc) {
                h.insert(header::LOCATION, v);
            }
        }
        resp
    }
}

/// Form / query parameters in order.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(raw: &[u8]) -> Params {
        Params(parse_urlencoded(raw))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
    }

    /// RFC 6749 §3.1/§3.2: parameters MUST NOT be included more than once.
    fn duplicate(&self) -> Option<&str> {
        let mut seen = BTreeSet::new();
        self.0.iter().map(|(k, _)| k.as_str()).find(|k| !seen.insert(*k))
    }
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space).
fn parse_urlencoded(raw: &[u8]) -> Vec<(String, String)> {
    raw.split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.iter().position(|b| *b == b'=') {
            Some(i) => (percent_decode(&pair[..i]), percent_decode(&pair[i + 1..])),
            None => (percent_decode(pair), String::new()),
        })
        .collect()
}

fn percent_decode(s: &[u8]) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `Authorization: Basic` client credentials (RFC 6749 §2.3.1: both parts
/// form-urlencoded before base64).
fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let s = String::from_utf8(decoded).ok()?;
    let (id, secret) = s.split_once(':')?;
    Some((percent_decode(id.as_bytes()), percent_decode(secret.as_bytes())))
}

/// `Authorization: Bearer <token>`
fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim().to_string())
}

/// Waits out the configured delay, then answers 503 if the provider is down.
async fn gate(sh: &Shared) -> Option<HttpReply> {
    let delay = sh.lock().settings.delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut st = sh.lock();
    if !st.settings.down {
        return None;
    }
    st.counts.refused_while_down += 1;
    Some(HttpReply::aad(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        90033,
        "A transient error has occurred. Please try again.",
    ))
}

fn record(st: &mut State, uri: &Uri, basic: &Option<(String, String)>, reply: &HttpReply) {
    record_with(st, uri, basic, reply, None);
}

fn record_with(st: &mut State, uri: &Uri, basic: &Option<(String, String)>, reply: &HttpReply, p: Option<&Params>) {
    let field = |k: &str| reply.body.as_ref().and_then(|b| b.get(k)).and_then(Value::as_str).map(str::to_string);
    let param = |k: &str| p.and_then(|p| p.get(k)).map(str::to_string);
    st.requests.push(SeenRequest {
        path: uri.path().to_string(),
        basic_auth_client: basic.as_ref().map(|(id, _)| id.clone()),
        status: reply.status.as_u16(),
        error: reply.error_field(),
        grant: param("grant_type"),
        scope: param("scope"),
        refresh_token: param("refresh_token"),
        issued_access_token: field("access_token"),
        issued_refresh_token: field("refresh_token"),
    });
}

async fn token_handler(AxState(sh): AxState<Arc<Shared>>, uri: Uri, headers: HeaderMap, body: Bytes) -> HttpReply {
    let params = Params::parse(&body);
    let basic = basic_auth(&headers);
    let reply = match gate(&sh).await {
        Some(r) => r,
        None => {
            // The URL the request was sent to is the audience assertions must name.
            let token_url = format!("{}{}", sh.base_url, uri.path());
            let mut st = sh.lock();
            let r = st.token(&params, &basic, &token_url);
            record_with(&mut st, &uri, &basic, &r, Some(&params));
            return r;
        }
    };
    record(&mut sh.lock(), &uri, &basic, &reply);
    reply
}

async fn devicecode_handler(AxState(sh): AxState<Arc<Shared>>, uri: Uri, headers: HeaderMap, body: Bytes) -> HttpReply {
    let params = Params::parse(&body);
    let basic = basic_auth(&headers);
    let reply = match gate(&sh).await {
        Some(r) => r,
        None => {
            let token_url =
                format!("{}{}", sh.base_url, uri.path().trim_end_matches("devicecode").to_string() + "token");
            let mut st = sh.lock();
            st.counts.devicecode_requests += 1;
            let r = st.devicecode(&params, &basic, &token_url, &sh.base_url).unwrap_or_else(|e| e);
            record_with(&mut st, &uri, &basic, &r, Some(&params));
            drop(st);
            sh.changed.notify_waiters();
            return r;
        }
    };
    record(&mut sh.lock(), &uri, &basic, &reply);
    reply
}

async fn authorize_handler(AxState(sh): AxState<Arc<Shared>>, uri: Uri, RawQuery(query): RawQuery) -> HttpReply {
    let params = Params::parse(query.unwrap_or_default().as_bytes());
    let reply = match gate(&sh).await {
        Some(r) => r,
        None => {
            let mut st = sh.lock();
            st.counts.authorize_requests += 1;
            st.authorize(&params).unwrap_or_else(|e| e)
        }
    };
    record(&mut sh.lock(), &uri, &None, &reply);
    reply
}

async fn introspect_handler(
    AxState(sh): AxState<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> HttpReply {
    let mut params = Params::parse(query.unwrap_or_default().as_bytes());
    params.0.extend(parse_urlencoded(&body));
    let token = params.get("token").map(str::to_string).or_else(|| bearer(&headers));
    let mut st = sh.lock();
    st.counts.introspect_requests += 1;
    let reply = st.introspect(token.as_deref());
    record(&mut st, &uri, &None, &reply);
    reply
}

// ---------------------------------------------------------------------------
// The provider's logic (pure state transitions, no I/O)
// ---------------------------------------------------------------------------

impl State {
    fn new_access_token(
        &mut self,
        account: &str,
        client_id: Option<&str>,
        scope: &str,
        grant: Option<Grant>,
        lifetime: Duration,
    ) -> String {
        let token = format!("fake-at-{}", random_b64url(24));
        self.access.insert(
            token.clone(),
            AccessRecord {
                account: account.to_string(),
                client_id: client_id.map(str::to_string),
                scope: scope.to_string(),
                grant,
                expires_at: Instant::now() + lifetime,
                revoked: false,
            },
        );
        token
    }

    fn new_refresh_token(&mut self, account: &str, client_id: Option<&str>, scope: &str) -> String {
        let token = format!("fake-rt-{}", random_b64url(32));
        self.refresh.insert(
            token.clone(),
            RefreshRecord {
                account: account.to_string(),
                client_id: client_id.map(str::to_string),
                scope: scope.to_string(),
                revoked: false,
            },
        );
        token
    }

    /// The token response (RFC 6749 §5.1, Entra's field set). The access token is for the
    /// first resource `scope` names; a refresh token, when `refresh_scope` is given, covers
    /// that (the whole consent).
    fn issue(
        &mut self,
        grant: Grant,
        account: &str,
        client_id: Option<&str>,
        scope: &str,
        refresh_scope: Option<&str>,
    ) -> HttpReply {
        let lifetime = self.settings.access_token_lifetime;
        let scope = &first_resource_scope(scope);
        let at = self.new_access_token(account, client_id, scope, Some(grant), lifetime);
        let mut body = json!({
            "token_type": "Bearer",
            "scope": scope,
            "expires_in": lifetime.as_secs(),
            "ext_expires_in": lifetime.as_secs(),
            "access_token": at,
        });
        if let Some(rs) = refresh_scope {
            body["refresh_token"] = Value::String(self.new_refresh_token(account, client_id, rs));
        }
        // OpenID Connect: asked for `openid`, Entra adds an ID token naming who signed in.
        if scope.split_whitespace().any(|s| s == "openid") {
            body["id_token"] = Value::String(id_token(account));
        }
        HttpReply::ok(body)
    }

    /// Whether a delegated grant returns a refresh token for `scope`.
    fn wants_refresh(&self, scope: &str) -> bool {
        !self.settings.require_offline_access || scope.split_whitespace().any(|s| s == "offline_access")
    }

    /// The first requested scope this provider does not grant.
    fn ungrantable<'a>(&self, scope: &'a str) -> Option<&'a str> {
        let allowed = self.settings.grantable_scopes.as_ref()?;
        scope.split_whitespace().find(|s| !OIDC_SCOPES.contains(s) && !allowed.contains(*s))
    }

    fn check_scope(&self, scope: &str) -> Result<(), HttpReply> {
        match self.ungrantable(scope) {
            None => Ok(()),
            Some(bad) => Err(HttpReply::bad(
                "invalid_scope",
                70011,
                &format!(
                    "The provided request must include a 'scope' input parameter. The provided \
                     value for the input parameter 'scope' is not valid. The scope {bad} is not valid."
                ),
            )),
        }
    }

    /// Client authentication (RFC 6749 §2.3, RFC 7523 §2.2). Returns the
    /// client id and whether the client proved who it is (secret/assertion).
    fn authenticate_client(
        &self,
        p: &Params,
        basic: &Option<(String, String)>,
        token_url: &str,
    ) -> Result<(String, bool), HttpReply> {
        let form_id = p.get("client_id");
        let basic_id = basic.as_ref().map(|(id, _)| id.as_str());
        if let (Some(f), Some(b)) = (form_id, basic_id) {
            if f != b {
                return Err(HttpReply::client(
                    700021,
                    "The client_id in the request body does not match the one in the Authorization header.",
                ));
            }
        }
        if let Some(assertion) = p.get("client_assertion") {
            if p.get("client_assertion_type") != Some(CLIENT_ASSERTION_TYPE_JWT) {
                return Err(HttpReply::bad(
                    "invalid_request",
                    50027,
                    "Invalid client_assertion_type: expected \
                     urn:ietf:params:oauth:client-assertion-type:jwt-bearer.",
                ));
            }
            let id = self.verify_client_assertion(assertion, form_id.or(basic_id), token_url)?;
            return Ok((id, true));
        }
        let Some(client_id) = form_id.or(basic_id) else {
            return Err(HttpReply::missing("client_id"));
        };
        let Some(app) = self.clients.get(client_id) else {
            return Err(unknown_client(client_id));
        };
        let secret = p.get("client_secret").or(basic.as_ref().map(|(_, s)| s.as_str()));
        match (secret, &app.secret) {
            (None, _) => Ok((client_id.to_string(), false)),
            (Some(given), Some(real)) if given == real => {
                if app.secret_expired {
                    Err(HttpReply::client(
                        7000222,
                        &format!(
                            "The provided client secret keys for app '{client_id}' are expired. \
                             Visit the Azure portal to create new keys for your app: \
                             https://aka.ms/NewClientSecret, or consider using certificate \
                             credentials for added security: https://aka.ms/certCreds."
                        ),
                    ))
                } else {
                    Ok((client_id.to_string(), true))
                }
            }
            (Some(_), _) => Err(HttpReply::client(
                7000215,
                &format!(
                    "Invalid client secret provided. Ensure the secret being sent in the request \
                     is the client secret value, not the client secret ID, for a secret added to \
                     app '{client_id}'."
                ),
            )),
        }
    }

    /// Microsoft certificate credential checks: a signature with the registered
    /// key made with the algorithm the header names, `x5t#S256` header,
    /// `aud` = token URL, `iss` = `sub` = client id, `exp` in the future, `nbf`
    /// not ahead. Microsoft documents PS256 (RSASSA-PSS, RFC 7518 §3.5) with
    /// `x5t#S256`; RS256 (RFC 7518 §3.3) is still taken, as the shared test
    /// helper `RsaTestKey::client_assertion` signs with it. An RS256 signature
    /// labelled PS256 (or the reverse) does not verify.
    fn verify_client_assertion(
        &self,
        jwt: &str,
        client_id_param: Option<&str>,
        token_url: &str,
    ) -> Result<String, HttpReply> {
        let malformed =
            |why: &str| HttpReply::client(50027, &format!("JWT token is invalid or malformed. [Reason - {why}]"));
        let parsed = Jwt::parse(jwt).map_err(|e| malformed(&e))?;
        let verifier: &'static dyn ring::signature::VerificationAlgorithm =
            match parsed.header.get("alg").and_then(Value::as_str) {
                Some("PS256") => &ring::signature::RSA_PSS_2048_8192_SHA256,
                Some("RS256") => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                _ => return Err(malformed("alg must be PS256 (or RS256).")),
            };
        let iss = parsed.claim_str("iss").unwrap_or_default();
        let sub = parsed.claim_str("sub").unwrap_or_default();
        let client_id = client_id_param.unwrap_or(iss).to_string();
        if iss != client_id || sub != client_id {
            return Err(HttpReply::client(
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter. \
                 Review the documentation at \
                 https://docs.microsoft.com/en-us/azure/active-directory/develop/active-directory-certificate-credentials .",
            ));
        }
        let Some(app) = self.clients.get(&client_id) else {
            return Err(unknown_client(&client_id));
        };
        let bad_sig = |why: &str| {
            HttpReply::client(700027, &format!("Client assertion failed signature validation. [Reason - {why}]"))
        };
        let Some(key) = &app.assertion_key else {
            return Err(bad_sig("The key was not found."));
        };
        let Some(thumb) = parsed.header.get("x5t#S256").and_then(Value::as_str) else {
            return Err(bad_sig("The x5t#S256 header is missing."));
        };
        if let Some(expected) = &app.assertion_x5t_s256 {
            if thumb != expected {
                return Err(bad_sig(&format!("The key was not found., Thumbprint of key used by client: '{thumb}'")));
            }
        }
        let signature_valid = ring::signature::UnparsedPublicKey::new(verifier, key)
            .verify(parsed.signing_input.as_bytes(), &parsed.signature)
            .is_ok();
        if !signature_valid {
            return Err(bad_sig("The signature does not verify."));
        }
        if !parsed.audience_is(token_url) {
            return Err(HttpReply::client(
                700212,
                &format!(
                    "Client assertion audience claim does not match. Expected '{token_url}', got {}.",
                    parsed.claims.get("aud").unwrap_or(&Value::Null)
                ),
            ));
        }
        let now = unix_now();
        let exp = parsed.claim_u64("exp");
        let nbf = parsed.claim_u64("nbf");
        if exp.is_none_or(|e| e <= now) || nbf.is_some_and(|n| n > now + JWT_SKEW_SECS) {
            return Err(HttpReply::client(
                700024,
                &format!(
                    "Client assertion is not within its valid time range. Current time: {now}, \
                     assertion valid from {nbf:?}, expiry time of assertion {exp:?}."
                ),
            ));
        }
        Ok(client_id)
    }

    /// `POST /token`
    fn token(&mut self, p: &Params, basic: &Option<(String, String)>, token_url: &str) -> HttpReply {
        if let Some(dup) = p.duplicate() {
            return HttpReply::bad(
                "invalid_request",
                9002313,
                &format!("Invalid request. Request is malformed or invalid. Parameter '{dup}' was repeated."),
            );
        }
        let Some(gt) = p.get("grant_type") else {
            self.counts.bad_grant_requests += 1;
            return HttpReply::missing("grant_type");
        };
        let Some(grant) = Grant::parse(gt) else {
            self.counts.bad_grant_requests += 1;
            return HttpReply::bad(
                "unsupported_grant_type",
                70003,
                &format!("The app requested an unsupported grant type '{gt}'."),
            );
        };
        *self.counts.token_requests.entry(grant).or_default() += 1;
        let answer = match grant {
            Grant::ClientCredentials => self.grant_client_credentials(p, basic, token_url),
            Grant::RefreshToken => self.grant_refresh(p, basic, token_url),
            Grant::DeviceCode => self.grant_device_code(p, basic, token_url),
            Grant::AuthorizationCode => self.grant_authorization_code(p, basic, token_url),
            Grant::JwtBearer => self.grant_jwt_bearer(p, token_url),
        };
        match answer {
            Ok(r) => {
                *self.counts.tokens_issued.entry(grant).or_default() += 1;
                r
            }
            Err(r) => r,
        }
    }

    fn grant_client_credentials(&mut self, p: &Params, basic: &Option<(String, String)>, token_url: &str) -> Answer {
        let (client_id, authenticated) = self.authenticate_client(p, basic, token_url)?;
        if !authenticated {
            return Err(HttpReply::client(
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            ));
        }
        let scope = p.get("scope").ok_or_else(|| HttpReply::missing("scope"))?;
        if let Some(bad) = scope.split_whitespace().find(|s| !s.ends_with("/.default")) {
            return Err(HttpReply::bad(
                "invalid_scope",
                1002012,
                &format!(
                    "The provided value for scope {bad} is not valid. Client credential flows \
                     must have a scope value with /.default suffixed to the resource identifier \
                     (application ID URI)."
                ),
            ));
        }
        one_resource(scope)?;
        self.check_scope(scope)?;
        let account = self.clients[&client_id].app_account.clone().unwrap_or_else(|| format!("app:{client_id}"));
        Ok(self.issue(Grant::ClientCredentials, &account, Some(&client_id), scope, None))
    }

    fn grant_refresh(&mut self, p: &Params, basic: &Option<(String, String)>, token_url: &str) -> Answer {
        let (client_id, _) = self.authenticate_client(p, basic, token_url)?;
        let rt = p.get("refresh_token").ok_or_else(|| HttpReply::missing("refresh_token"))?;
        if let Some((left, e)) = self.settings.passing_refusals.take() {
            if left > 1 {
                self.settings.passing_refusals = Some((left - 1, e.clone()));
            }
            return Err(HttpReply::bad("invalid_grant", e.code, &e.description));
        }
        let Some(rec) = self.refresh.get(rt).filter(|r| !r.revoked) else {
            let e = &self.settings.invalid_grant;
            return Err(HttpReply::bad("invalid_grant", e.code, &e.description));
        };
        if rec.client_id.as_deref().is_some_and(|c| c != client_id) {
            return Err(HttpReply::bad(
                "invalid_grant",
                70000,
                "Provided grant is invalid or malformed. The refresh token was issued to a different client.",
            ));
        }
        let account = rec.account.clone();
        let consent = rec.scope.clone();
        // No scope: the first resource of the grant.
        let scope = p.get("scope").map(str::to_string).unwrap_or_else(|| first_resource_scope(&rec.scope));
        one_resource(&scope)?;
        // Entra: a refresh may ask only for scopes granted at sign-in (a token issued directly
        // by a test, with no scope recorded, stands for any sign-in).
        let granted = |s: &str| rec.scope.is_empty() || rec.scope.split_whitespace().any(|g| g == s);
        if !scope.split_whitespace().all(granted) {
            return Err(HttpReply::bad(
                "invalid_grant",
                70000,
                "The request was denied because one or more scopes requested are unauthorized or expired. \
                 The user must first sign in and grant the client application access to the requested scope.",
            ));
        }
        self.check_scope(&scope)?;
        let rotate = self.settings.rotate_refresh_tokens;
        // A rotated refresh token carries the whole grant, whichever resource was asked for.
        Ok(self.issue(Grant::RefreshToken, &account, Some(&client_id), &scope, rotate.then_some(consent.as_str())))
    }

    fn grant_device_code(&mut self, p: &Params, basic: &Option<(String, String)>, token_url: &str) -> Answer {
        let (client_id, _) = self.authenticate_client(p, basic, token_url)?;
        let code = p.get("device_code").ok_or_else(|| HttpReply::missing("device_code"))?;
        let forced = self.settings.forced_slow_downs > 0;
        if forced {
            self.settings.forced_slow_downs -= 1;
        }
        let now = Instant::now();
        let Some(d) = self.devices.iter_mut().find(|d| d.device_code == code) else {
            return Err(HttpReply::bad(
                "invalid_grant",
                70000,
                "Provided grant is invalid or malformed. Unknown device_code.",
            ));
        };
        if d.client_id != client_id {
            return Err(HttpReply::bad(
                "invalid_grant",
                70000,
                "Provided grant is invalid or malformed. The device_code was issued to a different client.",
            ));
        }
        if d.state == DeviceState::Redeemed {
            return Err(HttpReply::already_redeemed());
        }
        if now >= d.expires_at {
            return Err(HttpReply::bad(
                "expired_token",
                70020,
                "The provided value for the input parameter 'device_code' is not valid. This \
                 device code has expired.",
            ));
        }
        // RFC 8628 §3.5: polling faster than the interval gets slow_down, and
        // the interval grows by 5 s for this and every later request.
        let too_fast = d.interval_secs > 0
            && d.last_poll.is_some_and(|t| now.duration_since(t) < Duration::from_secs(d.interval_secs));
        d.last_poll = Some(now);
        if forced || too_fast {
            d.interval_secs += SLOW_DOWN_INCREMENT_SECS;
            return Err(HttpReply::bad(
                "slow_down",
                70016,
                &format!(
                    "OAuth 2.0 device flow error. Polling too fast; wait at least {} seconds between requests.",
                    d.interval_secs
                ),
            ));
        }
        match d.state.clone() {
            DeviceState::Pending => Err(HttpReply::bad(
                "authorization_pending",
                70016,
                "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
            )),
            DeviceState::Denied => {
                Err(HttpReply::bad("access_denied", 65004, "User declined to consent to access the app."))
            }
            DeviceState::Redeemed => unreachable!("checked above"),
            DeviceState::Approved(account) => {
                d.state = DeviceState::Redeemed;
                let scope = d.scope.clone();
                let refresh = self.wants_refresh(&scope);
                Ok(self.issue(Grant::DeviceCode, &account, Some(&client_id), &scope, refresh.then_some(scope.as_str())))
            }
        }
    }

    fn grant_authorization_code(&mut self, p: &Params, basic: &Option<(String, String)>, token_url: &str) -> Answer {
        let (client_id, _) = self.authenticate_client(p, basic, token_url)?;
        let code = p.get("code").ok_or_else(|| HttpReply::missing("code"))?;
        let now = Instant::now();
        let expired = || {
            HttpReply::bad(
                "invalid_grant",
                70008,
                "The provided authorization code or refresh token has expired due to \
                 inactivity. Send a new interactive authorization request for this user and resource.",
            )
        };
        let Some(rec) = self.codes.get(code) else {
            return Err(expired());
        };
        if rec.used {
            return Err(HttpReply::already_redeemed());
        }
        if now >= rec.expires_at {
            return Err(expired());
        }
        if rec.client_id != client_id {
            return Err(HttpReply::bad(
                "invalid_grant",
                70000,
                "Provided grant is invalid or malformed. The code was issued to a different client.",
            ));
        }
        let redirect = p.get("redirect_uri").unwrap_or_default();
        if redirect != rec.redirect_uri {
            return Err(HttpReply::bad(
                "invalid_grant",
                500112,
                &format!(
                    "The reply address '{redirect}' does not match the reply address '{}' \
                     provided when requesting Authorization code.",
                    rec.redirect_uri
                ),
            ));
        }
        // RFC 7636 §4.6: BASE64URL(SHA256(ASCII(code_verifier))) == code_challenge.
        // A failed check leaves the code unused, so a test can try again.
        if let Some(challenge) = &rec.challenge {
            let verifier = p.get("code_verifier").unwrap_or_default();
            let well_formed = (43..=128).contains(&verifier.len())
                && verifier.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
            if !well_formed || b64url(sha256(verifier.as_bytes())) != *challenge {
                return Err(HttpReply::bad(
                    "invalid_grant",
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                ));
            }
        }
        let (account, scope) = (rec.account.clone(), rec.scope.clone());
        // Entra: the redemption may name scopes, of one resource and consented to.
        let token_scope = match p.get("scope") {
            Some(asked) => {
                one_resource(asked)?;
                if let Some(bad) = asked.split_whitespace().find(|a| !scope.split_whitespace().any(|g| g == *a)) {
                    return Err(HttpReply::bad(
                        "invalid_grant",
                        70000,
                        &format!("The request was denied because scope {bad} was not consented to in the authorization request."),
                    ));
                }
                asked.to_string()
            }
            None => scope.clone(),
        };
        self.codes.get_mut(code).expect("checked").used = true;
        let refresh = self.wants_refresh(&scope);
        Ok(self.issue(
            Grant::AuthorizationCode,
            &account,
            Some(&client_id),
            &token_scope,
            refresh.then_some(scope.as_str()),
        ))
    }

    /// Google's service-account grant (RFC 7523 §2.1), Google-style errors.
    fn grant_jwt_bearer(&mut self, p: &Params, token_url: &str) -> Answer {
        let assertion = p
            .get("assertion")
            .ok_or_else(|| HttpReply::google("invalid_request", "Missing required parameter: assertion"))?;
        let parsed = Jwt::parse(assertion).map_err(|_| HttpReply::google("invalid_grant", "Invalid JWT Signature."))?;
        let iss = parsed.claim_str("iss").unwrap_or_default().to_string();
        let Some(key) = self.service_accounts.get(&iss) else {
            return Err(HttpReply::google("invalid_grant", "Invalid grant: account not found"));
        };
        if parsed.header.get("alg").and_then(Value::as_str) != Some("RS256") || !parsed.signature_valid(key) {
            return Err(HttpReply::google("invalid_grant", "Invalid JWT Signature."));
        }
        if !parsed.audience_is(token_url) {
            return Err(HttpReply::google(
                "invalid_grant",
                &format!("Invalid JWT: Failed audience check. The right audience is {token_url}"),
            ));
        }
        let now = unix_now();
        let (iat, exp) = (parsed.claim_u64("iat"), parsed.claim_u64("exp"));
        let timely = matches!((iat, exp), (Some(i), Some(e))
            if e > now && i <= now + JWT_SKEW_SECS && e > i && e - i <= GOOGLE_MAX_ASSERTION_SECS);
        if !timely {
            return Err(HttpReply::google(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable \
                 timeframe. Check your iat and exp values in the JWT claim.",
            ));
        }
        let scope = parsed.claim_str("scope").unwrap_or_default().to_string();
        if scope.is_empty() || self.ungrantable(&scope).is_some() {
            return Err(HttpReply::google("invalid_scope", "Invalid OAuth scope or ID token audience provided."));
        }
        let account = parsed.claim_str("sub").unwrap_or(&iss).to_string();
        Ok(self.issue(Grant::JwtBearer, &account, None, &scope, None))
    }

    /// `POST /devicecode` (RFC 8628 §3.1-3.2).
    fn devicecode(&mut self, p: &Params, basic: &Option<(String, String)>, token_url: &str, base_url: &str) -> Answer {
        let (client_id, _) = self.authenticate_client(p, basic, token_url)?;
        let scope = p.get("scope").ok_or_else(|| HttpReply::missing("scope"))?;
        if let Some(bad) = scope.split_whitespace().find(|s| self.settings.device_refused_scopes.contains(*s)) {
            return Err(HttpReply::google("invalid_scope", &format!("Invalid device flow scope: {bad}")));
        }
        self.check_scope(scope)?;
        let user_code = random_user_code();
        let device_code = format!("fake-dc-{}", random_b64url(24));
        let interval = self.settings.device_interval_secs;
        let lifetime = self.settings.device_lifetime;
        self.devices.push(DeviceAuth {
            device_code: device_code.clone(),
            user_code: user_code.clone(),
            client_id,
            scope: scope.to_string(),
            state: DeviceState::Pending,
            expires_at: Instant::now() + lifetime,
            interval_secs: interval,
            last_poll: None,
        });
        let verification_uri = format!("{base_url}/devicelogin");
        Ok(HttpReply::ok(json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": verification_uri,
            "expires_in": lifetime.as_secs(),
            "interval": interval,
            "message": format!(
                "To sign in, use a web browser to open the page {verification_uri} and enter \
                 the code {user_code} to authenticate."
            ),
        })))
    }

    /// `GET /authorize` (RFC 6749 §4.1.1-4.1.2, RFC 7636 §4.3).
    fn authorize(&mut self, p: &Params) -> Answer {
        let client_id = p.get("client_id").ok_or_else(|| HttpReply::missing("client_id"))?;
        if !self.clients.contains_key(client_id) {
            return Err(unknown_client(client_id));
        }
        let redirect_uri = p.get("redirect_uri").ok_or_else(|| HttpReply::missing("redirect_uri"))?;
        let Ok(redirect) = reqwest::Url::parse(redirect_uri) else {
            return Err(HttpReply::bad(
                "invalid_request",
                50011,
                &format!("The redirect URI '{redirect_uri}' specified in the request is not valid."),
            ));
        };
        let state = p.get("state");
        // Errors after this point go back to the client on the redirect (§4.1.2.1).
        let back = |pairs: &[(&str, &str)]| {
            let mut url = redirect.clone();
            {
                let mut q = url.query_pairs_mut();
                for (k, v) in pairs {
                    q.append_pair(k, v);
                }
                if let Some(s) = state {
                    q.append_pair("state", s);
                }
            }
            HttpReply::redirect(url.to_string())
        };
        let fail = |error: &str, code: u32, description: &str| {
            back(&[("error", error), ("error_description", &format!("AADSTS{code}: {description}"))])
        };
        if p.get("response_type") != Some("code") {
            return Err(fail(
                "unsupported_response_type",
                700054,
                "response_type must be 'code' for this application.",
            ));
        }
        let Some(scope) = p.get("scope") else {
            return Err(fail(
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
            ));
        };
        if let Some(bad) = self.ungrantable(scope) {
            return Err(fail("invalid_scope", 70011, &format!("The scope {bad} is not valid.")));
        }
        let challenge = p.get("code_challenge");
        if challenge.is_none() && self.settings.require_pkce {
            return Err(fail(
                "invalid_request",
                9002325,
                "Proof Key for Code Exchange is required for cross-origin authorization code redemption.",
            ));
        }
        if challenge.is_some() && p.get("code_challenge_method") != Some("S256") {
            return Err(fail("invalid_request", 5000751, "code_challenge_method must be S256 in this provider."));
        }
        let Some(account) = self.settings.authorize_account.clone() else {
            return Err(fail("access_denied", 65004, "User declined to consent to access the app."));
        };
        let code = format!("fake-ac-{}", random_b64url(24));
        self.codes.insert(
            code.clone(),
            AuthCode {
                client_id: client_id.to_string(),
                redirect_uri: redirect_uri.to_string(),
                challenge: challenge.map(str::to_string),
                scope: scope.to_string(),
                account,
                expires_at: Instant::now() + AUTH_CODE_LIFETIME,
                used: false,
            },
        );
        Ok(back(&[("code", &code)]))
    }

    /// RFC 7662 §2.2 answer; Dovecot reads `active` and `username`.
    fn introspect(&self, token: Option<&str>) -> HttpReply {
        let now = Instant::now();
        match token.and_then(|t| self.access.get(t)).filter(|r| r.live(now)) {
            Some(r) => HttpReply::ok(json!({
                "active": true,
                "username": r.account,
                "email": r.account,
                "sub": r.account,
                "scope": r.scope,
                "client_id": r.client_id,
                "token_type": "Bearer",
                "exp": unix_now() + r.expires_at.duration_since(now).as_secs(),
            })),
            None => HttpReply::ok(json!({"active": false})),
        }
    }
}

/// The resource a scope belongs to: the scheme and host of a URL scope (Google's scopes all
/// count as one, "google"); Graph's for a bare name (`Mail.Send`, as Entra reads it);
/// none for the OpenID Connect scopes.
pub fn scope_resource(scope: &str) -> Option<String> {
    if OIDC_SCOPES.contains(&scope) {
        return None;
    }
    let Some((scheme, rest)) = scope.split_once("://") else {
        return Some(GRAPH_RESOURCE.to_string());
    };
    let host = rest.split('/').next().unwrap_or("").to_ascii_lowercase();
    if host == "mail.google.com" || host.ends_with("googleapis.com") {
        return Some("google".into());
    }
    Some(format!("{}://{host}", scheme.to_ascii_lowercase()))
}

/// The resources `scope` names, in order.
pub fn scope_resources(scope: &str) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for r in scope.split_whitespace().filter_map(scope_resource) {
        if !v.contains(&r) {
            v.push(r);
        }
    }
    v
}

/// `scope` cut down to its first resource's scopes (and the OpenID ones): what a token
/// issued for a consent spanning several resources is for.
fn first_resource_scope(scope: &str) -> String {
    let first = scope_resources(scope).into_iter().next();
    scope
        .split_whitespace()
        .filter(|s| match scope_resource(s) {
            None => true,
            r => r == first,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Entra's refusal of a token request for several resources at once.
fn one_resource(scope: &str) -> Result<(), HttpReply> {
    if scope_resources(scope).len() <= 1 {
        return Ok(());
    }
    Err(HttpReply::bad(
        "invalid_scope",
        28000,
        &format!(
            "Provided value for the input parameter scope is not valid because it contains more than one \
             resource. Scope {scope} is not valid."
        ),
    ))
}

/// Whether a token of `scope` is for `resource` (a resource identifier such as
/// `https://graph.microsoft.com`, or for Google a scope or "google": then a token carrying
/// `gmail.send` or `https://mail.google.com/`). A token with no scope (issued directly by a
/// test) stands for any resource.
fn token_is_for(scope: &str, resource: &str) -> bool {
    if scope.trim().is_empty() {
        return true;
    }
    if resource.contains("google") {
        return scope.split_whitespace().any(|s| s == GOOGLE_SEND_SCOPE || s == GOOGLE_MAIL_SCOPE);
    }
    let want = resource.trim_end_matches('/').to_ascii_lowercase();
    scope_resources(scope).contains(&want)
}

/// Whether the mail servers (SMTP, IMAP) take a token of `scope`: not Graph's, not a Google
/// token that may only send through the Gmail API.
fn token_fits_mail(scope: &str) -> bool {
    let resources = scope_resources(scope);
    if resources.iter().any(|r| r.contains("graph") || r.contains("chinacloudapi")) {
        return false;
    }
    resources != ["google"] || scope.split_whitespace().any(|s| s == GOOGLE_MAIL_SCOPE)
}

fn unknown_client(client_id: &str) -> HttpReply {
    HttpReply::bad(
        "unauthorized_client",
        700016,
        &format!(
            "Application with identifier '{client_id}' was not found in the directory 'fake'. \
             This can happen if the application has not been installed by the administrator of \
             the tenant or consented to by any user in the tenant."
        ),
    )
}

/// Eight characters from an alphabet without look-alikes, like `BCDF-GHJK`
/// without the dash.
fn random_user_code() -> String {
    use ring::rand::SecureRandom;
    const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ23456789";
    let mut buf = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut buf).expect("system RNG");
    buf.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect()
}

/// A compact JWS, split and decoded (RFC 7515 §7.1), not yet verified.
struct Jwt {
    header: Value,
    claims: Value,
    signing_input: String,
    signature: Vec<u8>,
}

impl Jwt {
    fn parse(jwt: &str) -> Result<Jwt, String> {
        let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = jwt.split('.');
        let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err("a JWT has three dot-separated parts.".into());
        };
        let json = |seg: &str| -> Result<Value, String> {
            let bytes = b64.decode(seg).map_err(|e| format!("bad base64url: {e}."))?;
            serde_json::from_slice(&bytes).map_err(|e| format!("bad JSON: {e}."))
        };
        Ok(Jwt {
            header: json(h)?,
            claims: json(c)?,
            signing_input: format!("{h}.{c}"),
            signature: b64.decode(s).map_err(|e| format!("bad signature base64url: {e}."))?,
        })
    }

    /// RS256 = RSASSA-PKCS1-v1_5 with SHA-256 (RFC 7518 §3.3); `key` is a
    /// PKCS#1 `RSAPublicKey` DER.
    fn signature_valid(&self, key: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, key)
            .verify(self.signing_input.as_bytes(), &self.signature)
            .is_ok()
    }

    fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    fn claim_u64(&self, name: &str) -> Option<u64> {
        self.claims.get(name).and_then(Value::as_u64)
    }

    /// `aud` is a string or an array of strings (RFC 7519 §4.1.3).
    fn audience_is(&self, url: &str) -> bool {
        match self.claims.get("aud") {
            Some(Value::String(s)) => s == url,
            Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(url)),
            _ => false,
        }
    }
}
