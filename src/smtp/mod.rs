//! The device-facing SMTP server (RFC 5321 with the extensions printers use).
//!
//! `listener` accepts connections (TLS, limits, shutdown), `session` runs one conversation as
//! a state machine over the typed commands of `command` and the typed replies of `reply`;
//! `auth` decodes AUTH PLAIN/LOGIN, `data` decodes the DATA stream, `connection` frames the
//! bytes. Everything a session needs from the rest of the relay is in [`Context`].

pub mod auth;
pub mod command;
pub mod connection;
pub mod data;
pub mod listener;
pub mod reply;
pub mod session;

use std::sync::Arc;

use crate::delivery::Delivery;
use crate::devices::Devices;
use crate::oauth::tokens::TokenManager;
use crate::queue::Queue;

/// What sessions share: the relay's state, as of the current configuration.
pub struct Context {
    pub hostname: String,
    pub devices: Arc<Devices>,
    pub queue: Arc<Queue>,
    pub delivery: Arc<Delivery>,
    pub tokens: Arc<TokenManager>,
    pub throttle: Arc<auth::AuthThrottle>,
    pub max_recipients: usize,
    pub activity: Arc<crate::activity::Activity>,
}

impl Context {
    /// The largest message the identity's provider takes, if it has a limit.
    pub fn provider_limit(&self, identity: &str) -> Option<u64> {
        self.tokens.slot(identity).ok().and_then(|s| s.provider.max_message_size)
    }

    /// The smallest provider limit over every device's identity (for EHLO before AUTH).
    pub fn smallest_provider_limit(&self) -> Option<u64> {
        self.devices.all().iter().filter_map(|d| self.provider_limit(&d.identity)).min()
    }
}

/// Failed logins from one address before AUTH is refused for a while.
pub const AUTH_MAX_FAILURES: u32 = 5;
/// How long AUTH stays refused after too many failures.
pub const AUTH_BLOCK: std::time::Duration = std::time::Duration::from_secs(300);
