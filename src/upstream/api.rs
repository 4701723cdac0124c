//! What the HTTP mail APIs (Microsoft Graph, the Gmail API) share: the message to send, the
//! resumable state of a long send and where it is kept, and the reading of `Retry-After`.
//!
//! A large scan goes up in several requests (a Graph draft and its attachment uploads, a
//! Gmail resumable session). Each step's result is written to the message's queue record
//! before the next step starts ([`ProgressSink`]), so a crash or restart continues the same
//! draft or session instead of sending the message twice (ARCHITECTURE.md, "Graph and the
//! Gmail API").

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client::Envelope;
use super::trace::Observer;

/// The resumable state of a send through an HTTP API, kept in the queue record.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// Nothing was started, or nothing needs resuming.
    #[default]
    None,
    /// A Graph send under way.
    Graph(super::graph::Resume),
    /// A Gmail API resumable upload under way.
    Gmail(super::gmail::Resume),
    /// Files being saved to a `[[destination]]` (scan to folder).
    Folder(super::folder::Resume),
}

impl Progress {
    pub fn is_none(&self) -> bool {
        matches!(self, Progress::None)
    }
}

/// Where a send's [`Progress`] is made durable. `save` returns once the state is committed
/// to disk: the step it protects starts only then.
pub trait ProgressSink: Send + Sync {
    fn save<'a>(&'a self, progress: &'a Progress) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

/// A sink that keeps nothing: `mfd-relay test` (its message is never queued).
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn save<'a>(&'a self, _: &'a Progress) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async { Ok(()) })
    }
}

/// One message to send upstream, whichever the path ([`super::Upstream::send`]).
pub struct Outbound<'a> {
    /// The identity's name (logs, limits, its SMTP connection pool).
    pub identity: &'a str,
    /// The mailbox that sends (`[[identity]] email`): Graph's `/users/{mailbox}`. SMTP logs in
    /// as the token's account instead (a delegate of a shared mailbox, see `Upstream::send`).
    pub mailbox: &'a str,
    /// Envelope sender and recipients: the recipients the API must send to, exactly.
    pub env: &'a Envelope<'a>,
    /// The spooled message, as it would go out by SMTP (rewrites and Received applied).
    pub body: &'a Path,
    /// What an earlier attempt left to resume (`Progress::None` on a first attempt; SMTP
    /// has nothing to resume).
    pub progress: &'a Progress,
    pub sink: &'a dyn ProgressSink,
    pub obs: &'a dyn Observer,
}

/// The wait a `Retry-After` header asks for (RFC 9110 10.2.3): delay-seconds or an HTTP
/// date; `None` when absent or unreadable. Capped at an hour: a provider's throttle never
/// asks for more, and a bogus value must not park mail for days.
pub fn retry_after(value: Option<&str>, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = value?.trim();
    let secs = match v.parse::<u64>() {
        Ok(s) => s,
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
            (at.with_timezone(&chrono::Utc) - now).num_seconds().max(0) as u64
        }
    };
    Some(Duration::from_secs(secs.min(3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates_and_caps_them() {
        let now = chrono::DateTime::parse_from_rfc2822("Wed, 02 Dec 2026 10:00:00 GMT").expect("date").to_utc();
        assert_eq!(retry_after(Some("7"), now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(Some(" 120 "), now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(Some("Wed, 02 Dec 2026 10:00:30 GMT"), now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after(Some("Wed, 02 Dec 2026 09:00:00 GMT"), now), Some(Duration::ZERO));
        assert_eq!(retry_after(Some("999999"), now), Some(Duration::from_secs(3600)));
        assert_eq!(retry_after(Some("soon"), now), None);
        assert_eq!(retry_after(None, now), None);
    }
}
