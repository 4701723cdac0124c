//! When to tell the admin: conditions seen in one snapshot of the relay, and what changed
//! since the last look. Pure functions of their arguments (no clock, no I/O), so the whole
//! policy is tested below: a condition is announced once when it starts (after it lasted
//! long enough), reminded of daily while it lasts, announced once when it clears (after it
//! was gone at two checks in a row), and a condition that comes and goes is announced at
//! most [`MAX_STARTS_PER_DAY`] times a day.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::oauth::tokens::IdentityState;

/// Token refreshes must have failed this long before anyone is told (Prometheus's
/// `MfdRelayTokenRefreshFailing` waits as long).
pub const REFRESH_FAILING_AFTER: i64 = 15 * 60;
/// A message waiting longer than this is news.
pub const QUEUE_AGE: i64 = 30 * 60;
/// A client certificate expiring within this is news.
pub const CERT_WARNING: i64 = 30 * 86400;
/// A mailbox not checked for this long beyond the longest a healthy one goes without a
/// check ([`MailboxSnap::quiet`]) is news.
pub const MAILBOX_STALE: i64 = 15 * 60;
/// A condition is over when it was absent at this many checks in a row.
pub const CLEAR_AFTER_CHECKS: u32 = 2;
/// At most this many starts of one condition are announced in 24 hours; beyond, it is
/// followed quietly until it lasts long enough for a reminder.
pub const MAX_STARTS_PER_DAY: usize = 3;

/// What kind of trouble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An identity needs a person: a sign-in (delegated) or a fix at the provider (app-only).
    NeedsLogin,
    /// Token refreshes have failed for [`REFRESH_FAILING_AFTER`].
    RefreshFailing,
    /// A message has waited more than [`QUEUE_AGE`].
    QueueOld,
    /// An app-only identity's client certificate expires within [`CERT_WARNING`].
    CertificateExpiring,
    /// A mobile-print mailbox has not been checked for [`MAILBOX_STALE`].
    MailboxStale,
}

impl Kind {
    /// The name in keys, logs and JSON payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NeedsLogin => "needs_login",
            Kind::RefreshFailing => "refresh_failing",
            Kind::QueueOld => "queue_old",
            Kind::CertificateExpiring => "certificate_expiring",
            Kind::MailboxStale => "mailbox_stale",
        }
    }

    /// How long the condition must have been seen before it is announced.
    fn hold(self) -> i64 {
        match self {
            Kind::RefreshFailing => REFRESH_FAILING_AFTER,
            // The others carry their duration in what is observed (an age, an expiry).
            _ => 0,
        }
    }
}

/// One condition as seen now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    pub kind: Kind,
    /// The identity, provider or mailbox it is about; empty for the queue.
    pub subject: String,
    /// The identity at fault: a notification about it is never sent through it.
    pub identity: Option<String>,
    /// Whether a person signs this identity in (delegated), or nobody does (app-only).
    pub delegated: bool,
    /// What is known, for the message: the provider's last error, a time. Stable while the
    /// condition stays the same (times, not ages), so that the state only changes with news.
    pub detail: String,
}

impl Condition {
    /// One key per condition: its kind and subject.
    pub fn key(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.subject)
    }
}

/// One identity in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySnap {
    pub name: String,
    pub delegated: bool,
    pub state: IdentityState,
    pub last_error: Option<String>,
    /// Its provider has an SMTP server (it could send a notification).
    pub can_send: bool,
}

/// One mobile-print mailbox in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxSnap {
    pub name: String,
    /// Unix seconds of the last successful check.
    pub last_check: Option<i64>,
    /// The longest a healthy mailbox goes without a successful check, in seconds: its poll
    /// interval, or the IDLE renewal when the server pushes news (a quiet folder is checked
    /// only then).
    pub quiet: i64,
}

/// One provider's client certificate in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSnap {
    pub provider: String,
    /// Unix seconds; `None` when it cannot be read (the token manager logs that).
    pub not_after: Option<i64>,
    /// The app-only identities that sign with it.
    pub identities: Vec<String>,
}

/// What the relay looks like at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Unix seconds.
    pub now: i64,
    /// Unix seconds when the relay started (a mailbox never checked is news only later).
    pub started: i64,
    pub identities: Vec<IdentitySnap>,
    /// Arrival (unix seconds) of the oldest queued message.
    pub oldest_queued: Option<i64>,
    pub certificates: Vec<CertSnap>,
    pub mailboxes: Vec<MailboxSnap>,
}

/// A unix time as `2026-12-01 23:10 UTC`.
pub fn utc(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0).map(|d| d.format("%Y-%m-%d %H:%M UTC").to_string()).unwrap_or_default()
}

/// The conditions of a snapshot, in a stable order.
pub fn observe(s: &Snapshot) -> Vec<Condition> {
    let mut out = Vec::new();
    for i in &s.identities {
        let error = i.last_error.clone().unwrap_or_default();
        let kind = match i.state {
            IdentityState::Ready => continue,
            IdentityState::NeedsLogin => Kind::NeedsLogin,
            IdentityState::Error => Kind::RefreshFailing,
        };
        out.push(Condition {
            kind,
            subject: i.name.clone(),
            identity: Some(i.name.clone()),
            delegated: i.delegated,
            detail: error,
        });
    }
    if let Some(oldest) = s.oldest_queued {
        if s.now - oldest > QUEUE_AGE {
            out.push(Condition {
                kind: Kind::QueueOld,
                subject: String::new(),
                identity: None,
                delegated: false,
                detail: format!("the oldest message arrived {}", utc(oldest)),
            });
        }
    }
    for c in s.certificates.iter().filter(|c| !c.identities.is_empty()) {
        let Some(not_after) = c.not_after else { continue };
        if not_after - s.now < CERT_WARNING {
            out.push(Condition {
                kind: Kind::CertificateExpiring,
                subject: c.provider.clone(),
                identity: None,
                delegated: false,
                detail: format!(
                    "it expires {} (identities {}); days left: {}",
                    utc(not_after),
                    c.identities.join(", "),
                    ((not_after - s.now) / 86400).max(0)
                ),
            });
        }
    }
    for m in &s.mailboxes {
        let limit = m.quiet + MAILBOX_STALE;
        let detail = match m.last_check {
            Some(t) if s.now - t > limit => format!("last successful check {}", utc(t)),
            None if s.now - s.started > limit => {
                format!("no successful check since the relay started {}", utc(s.started))
            }
            _ => continue,
        };
        out.push(Condition {
            kind: Kind::MailboxStale,
            subject: m.name.clone(),
            identity: None,
            delegated: false,
            detail,
        });
    }
    out
}

/// What happened to a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Started,
    /// Still there, a day (`remind_every`) after the last word about it.
    Reminder,
    Cleared,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Started => "started",
            Change::Reminder => "reminder",
            Change::Cleared => "cleared",
        }
    }
}

/// One notification to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub change: Change,
    pub condition: Condition,
    /// Unix seconds when the condition was first seen.
    pub since: i64,
    /// Unix seconds of the check that produced this event.
    pub at: i64,
    /// This start is the last one announced today: the condition comes and goes.
    pub flapping: bool,
}

/// What is remembered about one condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracked {
    pub condition: Condition,
    /// Seen at the last check (or pending its clear); false: kept only for `starts`.
    pub active: bool,
    /// Unix seconds when it was first seen (this time).
    pub since: i64,
    /// Checks in a row without it.
    pub missing: u32,
    /// Whether its start was decided (announced, or kept quiet).
    pub announced: bool,
    /// Its start was not announced (too many today), so its clear is not either.
    pub quiet: bool,
    /// Unix seconds of the last word about it (start or reminder).
    pub last_sent: i64,
    /// Unix seconds of announced starts in the last 24 hours.
    pub starts: Vec<i64>,
}

/// The notifier's memory, by condition key (saved in the data directory, so a restart
/// announces nothing twice).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct State {
    pub conditions: BTreeMap<String, Tracked>,
}

/// Settings of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Seconds between reminders of a lasting condition.
    pub remind_every: i64,
}

/// The next state and the notifications to send, given the conditions observed at `now`.
pub fn step(prev: &State, observed: &[Condition], now: i64, policy: Policy) -> (State, Vec<Event>) {
    let mut next = prev.clone();
    let mut events = Vec::new();
    let event = |change, t: &Tracked, flapping| Event {
        change,
        condition: t.condition.clone(),
        since: t.since,
        at: now,
        flapping,
    };
    for t in next.conditions.values_mut() {
        t.starts.retain(|&s| now - s < 86400);
    }
    let mut seen = HashSet::new();
    for c in observed {
        let key = c.key();
        if !seen.insert(key.clone()) {
            continue;
        }
        let t = next.conditions.entry(key).or_insert_with(|| Tracked {
            condition: c.clone(),
            active: false,
            since: now,
            missing: 0,
            announced: false,
            quiet: false,
            last_sent: now,
            starts: Vec::new(),
        });
        if !t.active {
            t.active = true;
            t.since = now;
            t.announced = false;
            t.quiet = false;
        }
        t.condition = c.clone();
        t.missing = 0;
        if !t.announced {
            if now - t.since >= c.kind.hold() {
                t.announced = true;
                t.last_sent = now;
                if t.starts.len() >= MAX_STARTS_PER_DAY {
                    t.quiet = true;
                } else {
                    t.starts.push(now);
                    events.push(event(Change::Started, t, t.starts.len() == MAX_STARTS_PER_DAY));
                }
            }
        } else if now - t.last_sent >= policy.remind_every {
            // A quiet condition that lasts a day is announced now, and its clear too.
            t.last_sent = now;
            t.quiet = false;
            events.push(event(Change::Reminder, t, false));
        }
    }
    // An identity whose failing refreshes turned into "needs a sign-in" has not recovered.
    let troubled: HashSet<&str> = observed.iter().filter_map(|c| c.identity.as_deref()).collect();
    for (key, t) in next.conditions.iter_mut() {
        if !t.active || seen.contains(key) {
            continue;
        }
        t.missing += 1;
        if t.condition.identity.as_deref().is_some_and(|i| troubled.contains(i)) {
            // Superseded by another condition of the same identity: no "cleared".
            t.active = false;
            t.announced = false;
            t.quiet = false;
        } else if !t.announced {
            // Never announced: forget it (a refresh failing must fail 15 minutes in a row).
            t.active = false;
        } else if t.missing >= CLEAR_AFTER_CHECKS {
            t.active = false;
            t.announced = false;
            if !t.quiet {
                events.push(event(Change::Cleared, t, false));
            }
            t.quiet = false;
        }
    }
    next.conditions.retain(|_, t| t.active || !t.starts.is_empty());
    (next, events)
}

/// The identity a notification mail goes through: one that is ready and can send, and that
/// no current condition is about (never the failing one). `None`: nobody can send now.
pub fn choose_sender(identities: &[IdentitySnap], state: &State) -> Option<String> {
    let troubled: HashSet<&str> =
        state.conditions.values().filter(|t| t.active).filter_map(|t| t.condition.identity.as_deref()).collect();
    // One that was in trouble today (and recovered) comes last.
    let recent: HashSet<&str> = state
        .conditions
        .values()
        .filter(|t| !t.starts.is_empty())
        .filter_map(|t| t.condition.identity.as_deref())
        .collect();
    identities
        .iter()
        .filter(|i| i.state == IdentityState::Ready && i.can_send && !troubled.contains(i.name.as_str()))
        .min_by_key(|i| (recent.contains(i.name.as_str()), i.name.as_str()))
        .map(|i| i.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86400;
    const POLICY: Policy = Policy { remind_every: DAY };
    const T0: i64 = 1_800_000_000;

    fn identity(name: &str, state: IdentityState) -> IdentitySnap {
        IdentitySnap {
            name: name.into(),
            delegated: true,
            state,
            last_error: (state != IdentityState::Ready).then(|| "AADSTS50173: grant revoked".into()),
            can_send: true,
        }
    }

    fn snapshot(now: i64, identities: Vec<IdentitySnap>) -> Snapshot {
        Snapshot { now, started: T0, identities, ..Default::default() }
    }

    /// Runs checks at `times` with the identity "office" in `state_at(t)`; returns every event.
    fn run(times: impl IntoIterator<Item = i64>, state_at: impl Fn(i64) -> IdentityState) -> (State, Vec<Event>) {
        let mut state = State::default();
        let mut all = Vec::new();
        for t in times {
            let snap = snapshot(t, vec![identity("scans", IdentityState::Ready), identity("office", state_at(t))]);
            let (next, events) = step(&state, &observe(&snap), t, POLICY);
            state = next;
            all.extend(events);
        }
        (state, all)
    }

    fn changes(events: &[Event]) -> Vec<(Change, String)> {
        events.iter().map(|e| (e.change, e.condition.key())).collect()
    }

    #[test]
    fn a_sign_in_needed_is_announced_once_then_cleared_once() {
        // Needs a sign-in from the first check to minute 10, then fixed: checks every minute.
        let (state, events) = run((0..30).map(|m| T0 + m * 60), |t| {
            if t < T0 + 600 {
                IdentityState::NeedsLogin
            } else {
                IdentityState::Ready
            }
        });
        assert_eq!(
            changes(&events),
            vec![(Change::Started, "needs_login:office".into()), (Change::Cleared, "needs_login:office".into())]
        );
        assert_eq!(events[0].at, T0, "announced at the first check");
        assert_eq!(events[1].at, T0 + 660, "cleared after two checks without it");
        assert_eq!(events[1].since, T0);
        assert!(events[0].condition.detail.contains("AADSTS50173"));
        // Kept only for the day's count of starts.
        assert!(!state.conditions["needs_login:office"].active);
    }

    #[test]
    fn one_good_check_does_not_clear_it() {
        let bad = |t: i64| if t == T0 + 300 { IdentityState::Ready } else { IdentityState::NeedsLogin };
        let (_, events) = run((0..20).map(|m| T0 + m * 60), bad);
        assert_eq!(changes(&events), vec![(Change::Started, "needs_login:office".into())]);
    }

    #[test]
    fn refreshes_failing_are_news_after_fifteen_minutes_only() {
        let (_, events) = run((0..14).map(|m| T0 + m * 60), |_| IdentityState::Error);
        assert!(events.is_empty(), "{events:?}");
        // Fails 14 minutes, works once, fails again: the 15 minutes start over.
        let flaky = |t: i64| if t == T0 + 14 * 60 { IdentityState::Ready } else { IdentityState::Error };
        let (_, events) = run((0..29).map(|m| T0 + m * 60), flaky);
        assert!(events.is_empty(), "{events:?}");
        let (_, events) = run((0..31).map(|m| T0 + m * 60), |_| IdentityState::Error);
        assert_eq!(changes(&events), vec![(Change::Started, "refresh_failing:office".into())]);
        assert_eq!(events[0].at, T0 + REFRESH_FAILING_AFTER);
    }

    #[test]
    fn failing_refreshes_that_turn_into_a_sign_in_are_not_cleared() {
        // Failing 20 minutes, then the provider says the grant is gone, then a sign-in.
        let state_at = |t: i64| match t - T0 {
            d if d < 20 * 60 => IdentityState::Error,
            d if d < 40 * 60 => IdentityState::NeedsLogin,
            _ => IdentityState::Ready,
        };
        let (_, events) = run((0..50).map(|m| T0 + m * 60), state_at);
        assert_eq!(
            changes(&events),
            vec![
                (Change::Started, "refresh_failing:office".into()),
                (Change::Started, "needs_login:office".into()),
                (Change::Cleared, "needs_login:office".into()),
            ]
        );
    }

    #[test]
    fn a_lasting_condition_is_reminded_of_daily_not_every_check() {
        let (_, events) = run((0..(3 * 24 * 60 + 1)).map(|m| T0 + m * 60), |_| IdentityState::NeedsLogin);
        assert_eq!(
            events.iter().map(|e| (e.change, e.at)).collect::<Vec<_>>(),
            vec![
                (Change::Started, T0),
                (Change::Reminder, T0 + DAY),
                (Change::Reminder, T0 + 2 * DAY),
                (Change::Reminder, T0 + 3 * DAY)
            ]
        );
    }

    #[test]
    fn a_flapping_condition_does_not_flood() {
        // Comes and goes every 4 minutes for two hours.
        let flapping = |t: i64| if (t - T0) / 240 % 2 == 0 { IdentityState::NeedsLogin } else { IdentityState::Ready };
        let (state, events) = run((0..120).map(|m| T0 + m * 60), flapping);
        let starts = events.iter().filter(|e| e.change == Change::Started).count();
        let clears = events.iter().filter(|e| e.change == Change::Cleared).count();
        assert_eq!((starts, clears), (MAX_STARTS_PER_DAY, MAX_STARTS_PER_DAY), "{:?}", changes(&events));
        assert!(events.iter().rfind(|e| e.change == Change::Started).unwrap().flapping);
        // A day later, still flapping: announced again (the day's count is over).
        let mut state = state;
        let mut later = Vec::new();
        for m in 0..60 {
            let t = T0 + DAY + 7200 + m * 60;
            let snap = snapshot(t, vec![identity("office", flapping(t))]);
            let (next, ev) = step(&state, &observe(&snap), t, POLICY);
            state = next;
            later.extend(ev);
        }
        assert!(later.iter().any(|e| e.change == Change::Started), "{:?}", changes(&later));
    }

    #[test]
    fn a_restart_announces_nothing_twice() {
        // The state is saved and read back; the condition is still there.
        let (state, events) = run([T0], |_| IdentityState::NeedsLogin);
        assert_eq!(events.len(), 1);
        let saved: State = serde_json::from_slice(&serde_json::to_vec(&state).unwrap()).unwrap();
        let snap = snapshot(T0 + 120, vec![identity("office", IdentityState::NeedsLogin)]);
        let (_, events) = step(&saved, &observe(&snap), T0 + 120, POLICY);
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn queue_certificate_and_mailbox_conditions() {
        let mut s = snapshot(T0, vec![]);
        s.started = T0 - 3600;
        s.oldest_queued = Some(T0 - QUEUE_AGE + 10);
        s.certificates = vec![
            CertSnap { provider: "app".into(), not_after: Some(T0 + 29 * DAY), identities: vec!["scans".into()] },
            CertSnap { provider: "later".into(), not_after: Some(T0 + 31 * DAY), identities: vec!["x".into()] },
            // A certificate no app-only identity signs with is nobody's problem.
            CertSnap { provider: "unused".into(), not_after: Some(T0 + DAY), identities: vec![] },
        ];
        // Quiet for at most 25 minutes (IDLE renewal), or 10 (polling): news 15 minutes later.
        s.mailboxes = vec![
            MailboxSnap { name: "print".into(), last_check: Some(T0 - 41 * 60), quiet: 25 * 60 },
            MailboxSnap { name: "quiet".into(), last_check: Some(T0 - 39 * 60), quiet: 25 * 60 },
            MailboxSnap { name: "slow".into(), last_check: Some(T0 - 24 * 60), quiet: 10 * 60 },
            MailboxSnap { name: "never".into(), last_check: None, quiet: 25 * 60 },
        ];
        let keys: Vec<String> = observe(&s).iter().map(Condition::key).collect();
        assert_eq!(keys, vec!["certificate_expiring:app", "mailbox_stale:print", "mailbox_stale:never"]);
        let c = observe(&s);
        assert!(c[0].detail.contains("days left: 29"), "{}", c[0].detail);
        s.oldest_queued = Some(T0 - QUEUE_AGE - 10);
        let keys: Vec<String> = observe(&s).iter().map(Condition::key).collect();
        assert!(keys.contains(&"queue_old:".to_string()), "{keys:?}");
        // A mailbox never checked right after the start is no news yet.
        s.started = T0 - 39 * 60;
        assert!(!observe(&s).iter().any(|c| c.subject == "never"));
    }

    #[test]
    fn mail_never_goes_through_the_failing_identity() {
        let ids = vec![identity("a-failing", IdentityState::Ready), identity("b-healthy", IdentityState::Ready)];
        // "a-failing" is ready again but its condition has not cleared yet: still not used.
        let mut state = State::default();
        let snap = snapshot(T0, vec![identity("a-failing", IdentityState::NeedsLogin)]);
        (state, _) = step(&state, &observe(&snap), T0, POLICY);
        assert_eq!(choose_sender(&ids, &state).as_deref(), Some("b-healthy"));
        // Without the condition, the first ready identity by name; one that recovered today
        // comes after the others.
        assert_eq!(choose_sender(&ids, &State::default()).as_deref(), Some("a-failing"));
        let snap = snapshot(T0 + 60, vec![identity("a-failing", IdentityState::Ready)]);
        let (recovered, _) = step(&state, &observe(&snap), T0 + 60, POLICY);
        let (recovered, events) = step(&recovered, &observe(&snap), T0 + 120, POLICY);
        assert_eq!(events.len(), 1, "cleared");
        assert_eq!(choose_sender(&ids, &recovered).as_deref(), Some("b-healthy"));
        assert_eq!(choose_sender(&ids[..1], &recovered).as_deref(), Some("a-failing"));
        // An identity that is not ready, or cannot send (IMAP only), is never chosen.
        let mut only = vec![identity("x", IdentityState::Error), identity("y", IdentityState::Ready)];
        only[1].can_send = false;
        assert_eq!(choose_sender(&only, &State::default()), None);
        // The only healthy identity is the failing one: nobody sends.
        let ids = vec![identity("a-failing", IdentityState::Ready)];
        assert_eq!(choose_sender(&ids, &state), None);
    }
}
