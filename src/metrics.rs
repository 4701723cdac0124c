//! Every Prometheus metric of the relay, named in one place.
//!
//! Label values come from the configuration (listener addresses, device, identity and
//! mailbox names) or from small fixed sets (reason classes), never from network input, so
//! the number of series is bounded by the config. Nothing here ever holds a secret.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The registry served on `/metrics`.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    REGISTRY.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    REGISTRY.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn gauge1(name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    REGISTRY.register(Box::new(g.clone())).expect("metric registered once");
    g
}

pub static BUILD_INFO: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge("mfd_relay_build_info", "Build information (always 1).", &["version"]));

pub static SMTP_CONNECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter("mfd_relay_smtp_connections_total", "Device connections accepted, by listener.", &["listener"])
});
pub static SMTP_REFUSED_CONNECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mfd_relay_smtp_connections_refused_total",
        "Device connections refused by connection limits, by listener.",
        &["listener"],
    )
});
pub static SMTP_SESSIONS_ACTIVE: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge("mfd_relay_smtp_sessions_active", "Open device sessions, by listener.", &["listener"]));
pub static SMTP_TLS_SESSIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mfd_relay_smtp_tls_sessions_total",
        "Device sessions that completed a TLS handshake, by listener and protocol version (TLSv1 ... TLSv1.3).",
        &["listener", "version"],
    )
});
pub static AUTH_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter("mfd_relay_auth_failures_total", "Failed device logins (AUTH), by listener.", &["listener"])
});

pub static MESSAGES_ACCEPTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mfd_relay_messages_accepted_total",
        "Messages accepted from devices and made durable, by device and identity.",
        &["device", "identity"],
    )
});
pub static MESSAGES_REJECTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mfd_relay_messages_rejected_total",
        "Messages or recipients refused to devices, by device (\"unknown\" when unmapped) and reason class.",
        &["device", "reason"],
    )
});
pub static MESSAGES_DELIVERED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mfd_relay_messages_delivered_total",
        "Messages delivered upstream, by identity, whether in session or from the queue, and the upstream path (smtp, graph, gmail_api).",
        &["identity", "path", "via"],
    )
});
pub static FILES_SAVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mfd_relay_files_saved_total",
        "Files saved to folder destinations (scan to folder), by destination and kind (sharepoint, onedrive, google_drive).",
        &["destination", "kind"],
    )
});
pub static FILE_BYTES_SAVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mfd_relay_file_bytes_saved_total",
        "Bytes of the files saved to folder destinations, by destination.",
        &["destination"],
    )
});
pub static MESSAGES_DEFERRED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mfd_relay_messages_deferred_total",
        "Delivery attempts that left the message queued, by identity and reason class.",
        &["identity", "reason"],
    )
});
pub static MESSAGES_FAILED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mfd_relay_messages_failed_total",
        "Messages refused permanently by the upstream, by identity and how the sender learnt it (reply or bounce).",
        &["identity", "via"],
    )
});
pub static UPSTREAM_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    let h = HistogramVec::new(
        HistogramOpts::new("mfd_relay_upstream_latency_seconds", "Time of one upstream delivery attempt, by identity.")
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
        &["identity"],
    )
    .expect("valid metric");
    REGISTRY.register(Box::new(h.clone())).expect("metric registered once");
    h
});
pub static MESSAGE_SIZE: LazyLock<Histogram> = LazyLock::new(|| {
    let h = Histogram::with_opts(
        HistogramOpts::new("mfd_relay_message_size_bytes", "Size of accepted messages.")
            .buckets(vec![4e3, 16e3, 64e3, 256e3, 1e6, 4e6, 16e6, 64e6]),
    )
    .expect("valid metric");
    REGISTRY.register(Box::new(h.clone())).expect("metric registered once");
    h
});
pub static QUEUE_DEPTH: LazyLock<IntGauge> =
    LazyLock::new(|| gauge1("mfd_relay_queue_depth", "Messages waiting in the queue."));
pub static QUEUE_OLDEST_AGE: LazyLock<IntGauge> =
    LazyLock::new(|| gauge1("mfd_relay_queue_oldest_age_seconds", "Age of the oldest queued message (0 when empty)."));

pub static QUEUE_SET_ASIDE: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge1(
        "mfd_relay_queue_set_aside",
        "Message files found without a queue record at start-up and moved to spool/set-aside for the admin to look at.",
    )
});
pub static STORE_FAILED: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge1(
        "mfd_relay_store_failed",
        "1 when a database write or sync failed; the relay then stops and must be restarted.",
    )
});

pub static TOKEN_REFRESHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mfd_relay_token_refreshes_total",
        "Token requests to the provider, by identity and result (ok or error).",
        &["identity", "result"],
    )
});
pub static TOKEN_EXPIRY: LazyLock<prometheus::GaugeVec> = LazyLock::new(|| {
    let g = prometheus::GaugeVec::new(
        Opts::new(
            "mfd_relay_token_expiry_timestamp_seconds",
            "When the current access token expires (unix time), by identity.",
        ),
        &["identity"],
    )
    .expect("valid metric");
    REGISTRY.register(Box::new(g.clone())).expect("metric registered once");
    g
});
pub static TOKEN_EXPIRES_IN: LazyLock<prometheus::GaugeVec> = LazyLock::new(|| {
    let g = prometheus::GaugeVec::new(
        Opts::new("mfd_relay_token_expires_in_seconds", "Seconds until the current access token expires, by identity."),
        &["identity"],
    )
    .expect("valid metric");
    REGISTRY.register(Box::new(g.clone())).expect("metric registered once");
    g
});
pub static IDENTITY_STATE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "mfd_relay_identity_state",
        "Identity state: 1 ready, 0 needs login (a person must sign in again), 2 last refresh failed.",
        &["identity"],
    )
});
pub static CERT_EXPIRY: LazyLock<prometheus::GaugeVec> = LazyLock::new(|| {
    let g = prometheus::GaugeVec::new(
        Opts::new(
            "mfd_relay_client_certificate_expiry_timestamp_seconds",
            "When a provider's client certificate expires (unix time).",
        ),
        &["provider"],
    )
    .expect("valid metric");
    REGISTRY.register(Box::new(g.clone())).expect("metric registered once");
    g
});

pub static IMAP_JOBS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mfd_relay_imap_jobs_total",
        "Mobile-print mails handled, by mailbox and result (spooled or refused).",
        &["mailbox", "result"],
    )
});
pub static IMAP_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter("mfd_relay_imap_errors_total", "IMAP connection, login, poll or IDLE errors, by mailbox.", &["mailbox"])
});
pub static IMAP_LAST_SUCCESS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "mfd_relay_imap_last_success_timestamp_seconds",
        "When a mailbox was last checked successfully (unix time).",
        &["mailbox"],
    )
});

/// Why a message or recipient was refused to a device: the `reason` label of
/// [`MESSAGES_REJECTED`]. The label is [`RejectReason::as_str`], so a reason and its label
/// cannot drift apart, and the label set is [`RejectReason::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The connection maps to no device (ARCHITECTURE.md, "Never an open relay").
    NotADevice,
    /// Over the size limit (SIZE= at MAIL, the DATA stream, or the header section).
    TooBig,
    /// A header that cannot be made valid (`message::Refusal`).
    BadHeader,
    /// The device's identity needs a new sign-in.
    NeedsLogin,
    /// The device's recipient allow-list refused the address.
    RecipientNotAllowed,
    /// The body or record could not be written.
    Storage,
    /// A message only for folder destinations has nothing to save (no attachment).
    NothingToSave,
}

impl RejectReason {
    /// Every reason, for label sets and tests.
    pub const ALL: [RejectReason; 7] = [
        RejectReason::NotADevice,
        RejectReason::TooBig,
        RejectReason::BadHeader,
        RejectReason::NeedsLogin,
        RejectReason::RecipientNotAllowed,
        RejectReason::Storage,
        RejectReason::NothingToSave,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NotADevice => "not_a_device",
            RejectReason::TooBig => "too_big",
            RejectReason::BadHeader => "bad_header",
            RejectReason::NeedsLogin => "needs_login",
            RejectReason::RecipientNotAllowed => "recipient_not_allowed",
            RejectReason::Storage => "storage",
            RejectReason::NothingToSave => "nothing_to_save",
        }
    }
}

/// Why a delivery attempt left a message queued: the `reason` label of
/// [`MESSAGES_DEFERRED`], from [`DeferReason::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeferReason {
    /// The identity's `messages_per_minute` is spent.
    RateLimit,
    /// The provider answered 4xx.
    Upstream4xx,
    /// The identity is no longer configured.
    Config,
    /// The identity needs a new sign-in.
    NeedsLogin,
    /// No access token could be had.
    Token,
    /// The provider refused the access token.
    Auth,
    /// The provider could not be reached.
    Network,
    /// The provider is throttling the mailbox (HTTP 429/503 with `Retry-After`).
    Throttled,
}

impl DeferReason {
    /// Every reason, for label sets and tests.
    pub const ALL: [DeferReason; 8] = [
        DeferReason::RateLimit,
        DeferReason::Upstream4xx,
        DeferReason::Config,
        DeferReason::NeedsLogin,
        DeferReason::Token,
        DeferReason::Auth,
        DeferReason::Network,
        DeferReason::Throttled,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeferReason::RateLimit => "rate_limit",
            DeferReason::Upstream4xx => "upstream_4xx",
            DeferReason::Config => "config",
            DeferReason::NeedsLogin => "needs_login",
            DeferReason::Token => "token",
            DeferReason::Auth => "auth",
            DeferReason::Network => "network",
            DeferReason::Throttled => "throttled",
        }
    }
}

/// Counts a refusal to a device (`device` is "unknown" when the connection maps to none).
pub fn rejected(device: &str, why: RejectReason) {
    MESSAGES_REJECTED.with_label_values(&[device, why.as_str()]).inc();
}

/// Counts a deferred delivery attempt.
pub fn deferred(identity: &str, why: DeferReason) {
    MESSAGES_DEFERRED.with_label_values(&[identity, why.as_str()]).inc();
}

/// Touches every metric so that all of them appear on /metrics from the start.
pub fn init() {
    BUILD_INFO.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    LazyLock::force(&SMTP_CONNECTIONS);
    LazyLock::force(&SMTP_REFUSED_CONNECTIONS);
    LazyLock::force(&SMTP_SESSIONS_ACTIVE);
    LazyLock::force(&SMTP_TLS_SESSIONS);
    LazyLock::force(&AUTH_FAILURES);
    LazyLock::force(&MESSAGES_ACCEPTED);
    LazyLock::force(&MESSAGES_REJECTED);
    LazyLock::force(&MESSAGES_DELIVERED);
    LazyLock::force(&MESSAGES_DEFERRED);
    LazyLock::force(&FILES_SAVED);
    LazyLock::force(&FILE_BYTES_SAVED);
    LazyLock::force(&MESSAGES_FAILED);
    LazyLock::force(&UPSTREAM_LATENCY);
    LazyLock::force(&MESSAGE_SIZE);
    LazyLock::force(&QUEUE_DEPTH);
    LazyLock::force(&QUEUE_OLDEST_AGE);
    LazyLock::force(&QUEUE_SET_ASIDE);
    LazyLock::force(&STORE_FAILED);
    LazyLock::force(&TOKEN_REFRESHES);
    LazyLock::force(&TOKEN_EXPIRY);
    LazyLock::force(&TOKEN_EXPIRES_IN);
    LazyLock::force(&IDENTITY_STATE);
    LazyLock::force(&CERT_EXPIRY);
    LazyLock::force(&IMAP_JOBS);
    LazyLock::force(&IMAP_ERRORS);
    LazyLock::force(&IMAP_LAST_SUCCESS);
    LazyLock::force(&NOTIFICATIONS);
}

pub static NOTIFICATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mfd_relay_notifications_total",
        "Notifications to the admin ([notify]), by channel (email, json, teams, slack) and result (sent: mail queued or webhook answered 2xx; failed: given up).",
        &["channel", "result"],
    )
});

/// The text exposition of every metric.
pub fn render() -> String {
    let now = chrono::Utc::now().timestamp() as f64;
    for m in TOKEN_EXPIRY.collect() {
        for s in m.get_metric() {
            if let Some(label) = s.get_label().first() {
                let exp = s.get_gauge().get_value();
                TOKEN_EXPIRES_IN.with_label_values(&[label.value()]).set((exp - now).max(0.0));
            }
        }
    }
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&REGISTRY.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

use prometheus::core::Collector;
