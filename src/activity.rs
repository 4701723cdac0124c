//! What each device and mailbox did lately, for the status page: last seen, messages today,
//! last error. Kept in memory only (it is a view, not a record); bounded by the config,
//! since entries are keyed by configured names.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::locks::MutexExt;

/// One device's recent activity.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DeviceActivity {
    /// Unix seconds of the last connection that was recognised as this device.
    pub last_seen: Option<i64>,
    /// The address it last connected from.
    pub last_address: Option<String>,
    /// Messages accepted since midnight (UTC).
    pub messages_today: u64,
    /// The day (days since the epoch, UTC) `messages_today` counts.
    day: i64,
    /// The last problem seen for this device, with its time.
    pub last_error: Option<(i64, String)>,
}

/// One mailbox's recent activity.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct MailboxActivity {
    pub last_check: Option<i64>,
    pub jobs_today: u64,
    day: i64,
    pub last_error: Option<(i64, String)>,
}

/// Activity of all devices and mailboxes.
#[derive(Default)]
pub struct Activity {
    devices: Mutex<HashMap<String, DeviceActivity>>,
    mailboxes: Mutex<HashMap<String, MailboxActivity>>,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Activity {
    /// A connection was recognised as `device` (by login or address).
    pub fn seen(&self, device: &str, address: &str) {
        let mut m = self.devices.locked();
        let d = m.entry(device.to_string()).or_default();
        d.last_seen = Some(now());
        d.last_address = Some(address.to_string());
    }

    /// `device` had a message accepted.
    pub fn accepted(&self, device: &str) {
        let t = now();
        let mut m = self.devices.locked();
        let d = m.entry(device.to_string()).or_default();
        if d.day != t / 86400 {
            d.day = t / 86400;
            d.messages_today = 0;
        }
        d.messages_today += 1;
    }

    /// Something went wrong for `device` (a refused login, a refused message, a bounce).
    pub fn device_error(&self, device: &str, error: &str) {
        let mut m = self.devices.locked();
        m.entry(device.to_string()).or_default().last_error = Some((now(), error.to_string()));
    }

    /// A mailbox was checked successfully; `jobs` new jobs were spooled.
    pub fn mailbox_checked(&self, mailbox: &str, jobs: u64) {
        let t = now();
        let mut m = self.mailboxes.locked();
        let b = m.entry(mailbox.to_string()).or_default();
        b.last_check = Some(t);
        if b.day != t / 86400 {
            b.day = t / 86400;
            b.jobs_today = 0;
        }
        b.jobs_today += jobs;
    }

    pub fn mailbox_error(&self, mailbox: &str, error: &str) {
        let mut m = self.mailboxes.locked();
        m.entry(mailbox.to_string()).or_default().last_error = Some((now(), error.to_string()));
    }

    pub fn device(&self, name: &str) -> DeviceActivity {
        let mut d = self.devices.locked().get(name).cloned().unwrap_or_default();
        if d.day != now() / 86400 {
            d.messages_today = 0;
        }
        d
    }

    pub fn mailbox(&self, name: &str) -> MailboxActivity {
        let mut b = self.mailboxes.locked().get(name).cloned().unwrap_or_default();
        if b.day != now() / 86400 {
            b.jobs_today = 0;
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_errors() {
        let a = Activity::default();
        assert_eq!(a.device("x"), DeviceActivity::default());
        a.seen("x", "10.0.0.1");
        a.accepted("x");
        a.accepted("x");
        a.device_error("x", "wrong PIN");
        let d = a.device("x");
        assert_eq!(d.messages_today, 2);
        assert_eq!(d.last_address.as_deref(), Some("10.0.0.1"));
        assert_eq!(d.last_error.unwrap().1, "wrong PIN");
        a.mailbox_checked("print", 3);
        a.mailbox_error("print", "login failed");
        assert_eq!(a.mailbox("print").jobs_today, 3);
    }
}
