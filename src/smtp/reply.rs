//! Every reply the device-facing session sends, named after what it means (ARCHITECTURE.md,
//! "Where each reply comes from").
//!
//! The reply *value* (code, RFC 3463 enhanced status, text; RFC 5321 4.2) is
//! [`crate::reply::Reply`]; this module is the session's catalogue of concrete replies, so
//! that the session reads like a transcript and every code/status pair is chosen in one
//! place. The one reply the session passes on without building it is the provider's
//! refusal (`delivery::Outcome::Refused`, built by `upstream::classify`).
//!
//! The catalogue is written through [`catalogue!`], which also lists every name in [`ALL`]:
//! the in-process session tests (`smtp::transcripts`) fail when a reply here is never produced.

use std::borrow::Cow;
use std::net::IpAddr;

use crate::queue::MessageId;
pub use crate::reply::{sanitize_text, Reply, Status};

/// Records, in test builds, that the catalogue produced a reply (see [`ALL`]).
#[cfg(test)]
fn produced(name: &'static str) {
    PRODUCED.lock().unwrap_or_else(|e| e.into_inner()).insert(name);
}
#[cfg(not(test))]
#[inline(always)]
fn produced(_: &'static str) {}

/// The names of the replies produced so far in this test process.
#[cfg(test)]
pub(crate) static PRODUCED: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Defines the catalogue's functions and [`ALL`], the list of their names.
macro_rules! catalogue {
    ($( $(#[$meta:meta])* pub fn $name:ident ( $($arg:ident : $ty:ty),* ) -> Reply $body:block )*) => {
        $(
            $(#[$meta])*
            pub fn $name($($arg: $ty),*) -> Reply {
                produced(stringify!($name));
                $body
            }
        )*
        /// The name of every reply in the catalogue.
        pub const ALL: &[&str] = &[$(stringify!($name)),*];
    };
}

catalogue! {
    /// RFC 5321 4.3.1: the opening 220.
    pub fn greeting(host: &str) -> Reply {
        Reply::new(220, None, format!("{host} ESMTP mfd-relay ready"))
    }
    /// RFC 5321 4.1.1.1: the answer to HELO (no extensions).
    pub fn helo(host: &str, name: &str) -> Reply {
        Reply::new(250, None, format!("{host} Hello {name}"))
    }
    /// RFC 5321 4.1.1.1: the answer to EHLO with the extensions offered: SIZE (RFC 1870),
    /// 8BITMIME (RFC 6152), PIPELINING (RFC 2920), ENHANCEDSTATUSCODES (RFC 2034), STARTTLS
    /// (RFC 3207) and AUTH (RFC 4954) when they may be used now.
    pub fn ehlo(host: &str, name: &str, peer: IpAddr, size: u64, starttls: bool, auth: bool) -> Reply {
        let mut lines: Vec<Cow<'static, str>> = vec![
            format!("{host} Hello {name} [{peer}]").into(),
            format!("SIZE {size}").into(),
            "8BITMIME".into(),
            "PIPELINING".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if starttls {
            lines.push("STARTTLS".into());
        }
        if auth {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("HELP".into());
        Reply::multi(250, lines)
    }
    /// NOOP.
    pub fn ok() -> Reply {
        Reply::with(250, Status(2, 0, 0), "OK")
    }
    /// MAIL accepted.
    pub fn sender_ok() -> Reply {
        Reply::with(250, Status(2, 1, 0), "Sender OK")
    }
    /// RCPT accepted.
    pub fn recipient_ok() -> Reply {
        Reply::with(250, Status(2, 1, 5), "Recipient OK")
    }
    /// RSET.
    pub fn reset() -> Reply {
        Reply::with(250, Status(2, 0, 0), "Reset")
    }
    /// RFC 5321 4.1.1.4: go ahead with DATA.
    pub fn start_data() -> Reply {
        Reply::new(354, None, "Start mail input; end with <CRLF>.<CRLF>")
    }
    /// QUIT.
    pub fn bye(host: &str) -> Reply {
        Reply::with(221, Status(2, 0, 0), format!("{host} closing connection"))
    }
    /// RFC 3207 4: the TLS handshake may start.
    pub fn ready_for_tls() -> Reply {
        Reply::with(220, Status(2, 0, 0), "Ready to start TLS")
    }
    /// RFC 4954 6: logged in.
    pub fn auth_ok() -> Reply {
        Reply::with(235, Status(2, 7, 0), "Authentication successful")
    }
    /// RFC 4954 4: a server challenge (base64 text).
    pub fn auth_challenge(b64: &'static str) -> Reply {
        Reply::new(334, None, b64)
    }
    /// RFC 5321 3.5.3: 252 when the server will accept but cannot verify.
    pub fn vrfy() -> Reply {
        Reply::with(252, Status(2, 5, 0), "Cannot VRFY user, but will accept message and attempt delivery")
    }
    /// HELP.
    pub fn help() -> Reply {
        Reply::with(214, Status(2, 0, 0), "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
    }

    /// A command whose arguments do not parse (`smtp::command::ParseError::Syntax`).
    pub fn syntax(text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::with(501, Status(5, 5, 4), text)
    }
    /// AUTH data that is not base64 (RFC 4954 4).
    pub fn bad_base64() -> Reply {
        Reply::with(501, Status(5, 5, 4), "Invalid base64 in AUTH")
    }
    /// RFC 5321 4.2.4.
    pub fn unknown_command() -> Reply {
        Reply::with(500, Status(5, 5, 1), "Command not recognized")
    }
    /// RFC 5321 4.5.3.1.4 / RFC 3463 5.5.6.
    pub fn line_too_long() -> Reply {
        Reply::with(500, Status(5, 5, 6), "Line too long")
    }
    /// RFC 5321 4.1.4: MAIL or AUTH before EHLO/HELO (again after STARTTLS, RFC 3207 4.2).
    pub fn greet_first() -> Reply {
        Reply::with(503, Status(5, 5, 1), "Send EHLO first")
    }
    /// RCPT or DATA without MAIL.
    pub fn mail_first() -> Reply {
        Reply::with(503, Status(5, 5, 1), "MAIL first")
    }
    /// MAIL inside a transaction.
    pub fn nested_mail() -> Reply {
        Reply::with(503, Status(5, 5, 1), "Nested MAIL command")
    }
    /// RFC 4954 4: a second AUTH.
    pub fn already_authenticated() -> Reply {
        Reply::with(503, Status(5, 5, 1), "Already authenticated")
    }
    /// RFC 4954 4: AUTH is not permitted during a mail transaction.
    pub fn auth_in_transaction() -> Reply {
        Reply::with(503, Status(5, 5, 1), "AUTH not allowed during a mail transaction")
    }
    /// RFC 2920 3.1: DATA after pipelined RCPTs that all failed.
    pub fn no_valid_recipients() -> Reply {
        Reply::with(554, Status(5, 5, 1), "No valid recipients")
    }
    /// A command the relay knows but does not do (`smtp::command::ParseError::NotImplemented`).
    pub fn not_implemented(text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::with(502, Status(5, 5, 1), text)
    }
    /// STARTTLS on a listener without it, or a second STARTTLS (RFC 3207 4).
    pub fn starttls_unavailable() -> Reply {
        Reply::with(502, Status(5, 5, 1), "STARTTLS not available")
    }
    /// RFC 5321 3.5.2: EXPN may be refused.
    pub fn expn() -> Reply {
        Reply::with(502, Status(5, 5, 1), "EXPN not supported")
    }
    /// RFC 5321 4.1.1.11 / RFC 1869: unrecognised MAIL/RCPT parameters get 555.
    pub fn param_not_recognized(text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::with(555, Status(5, 5, 4), text)
    }
    /// RFC 4954 4.
    pub fn mechanism_unsupported() -> Reply {
        Reply::with(504, Status(5, 5, 4), "Unrecognized authentication type")
    }
    /// RFC 4954 4: the client sent "*".
    pub fn auth_cancelled() -> Reply {
        Reply::with(501, Status(5, 0, 0), "Authentication cancelled")
    }
    /// RFC 4954 6: 535 5.7.8 for bad credentials.
    pub fn auth_failed() -> Reply {
        Reply::with(535, Status(5, 7, 8), "Authentication credentials invalid")
    }
    /// The address has too many failed logins (`smtp::auth::AuthThrottle`).
    pub fn auth_throttled() -> Reply {
        Reply::with(454, Status(4, 7, 0), "Too many failed logins from your address; try again later")
    }
    /// The username (rather than the address) has too many failed logins.
    pub fn login_throttled() -> Reply {
        Reply::with(454, Status(4, 7, 0), "Too many failed logins; try again later")
    }
    /// RFC 4954 6: AUTH before TLS where the listener requires TLS for it.
    pub fn encryption_required() -> Reply {
        Reply::with(538, Status(5, 7, 11), "Encryption required for requested authentication mechanism")
    }
    /// RFC 4954 6: MAIL without AUTH on a `require_auth` listener.
    pub fn auth_required() -> Reply {
        Reply::with(530, Status(5, 7, 0), "Authentication required")
    }
    /// RFC 3207 4: MAIL on a `require_auth` listener that allows AUTH only after STARTTLS.
    pub fn tls_required() -> Reply {
        Reply::with(530, Status(5, 7, 0), "Must issue a STARTTLS command first")
    }
    /// MAIL from a connection that maps to no device (ARCHITECTURE.md, "Never an open relay").
    pub fn not_a_device() -> Reply {
        Reply::with(
            550,
            Status(5, 7, 1),
            "Relaying denied: this address is not a configured device (log in, or ask IT to add it)",
        )
    }
    /// The device's recipient allow-list refuses the address.
    pub fn recipient_not_allowed() -> Reply {
        Reply::with(550, Status(5, 7, 1), "Recipient not allowed for this device")
    }
    /// RFC 5321 4.5.3.1.10: 452 makes the client send the rest in another transaction.
    pub fn too_many_recipients() -> Reply {
        Reply::with(452, Status(4, 5, 3), "Too many recipients")
    }
    /// MAIL FROM that is no usable address (RFC 3463 5.1.7).
    pub fn sender_unusable() -> Reply {
        Reply::with(553, Status(5, 1, 3), "Sender address not usable")
    }
    /// RCPT TO that is no usable address (RFC 3463 5.1.3).
    pub fn recipient_unusable() -> Reply {
        Reply::with(553, Status(5, 1, 3), "Recipient address not usable")
    }
    /// RFC 1870 6: over the size limit (at MAIL with SIZE=, or during DATA).
    pub fn message_too_big(limit: u64) -> Reply {
        Reply::with(552, Status(5, 3, 4), format!("Message too big (limit {limit} bytes)"))
    }
    /// A message that cannot be made valid (RFC 3463 5.6.0), or whose header section is
    /// over the limit (5.3.4).
    pub fn message_refused(why: &crate::message::Refusal) -> Reply {
        let text = format!("Message refused: {}", sanitize_text(&why.to_string(), 200));
        match why {
            crate::message::Refusal::HeaderTooBig => Reply::with(552, Status(5, 3, 4), text),
            _ => Reply::with(554, Status(5, 6, 0), text),
        }
    }
    /// The body or record could not be written (ARCHITECTURE.md, "Durability", fail-stop).
    pub fn storage_failed() -> Reply {
        Reply::with(452, Status(4, 3, 1), "Insufficient system storage; try again later")
    }
    /// The device's identity is no longer configured (a reload during the transaction).
    pub fn local_error() -> Reply {
        Reply::with(451, Status(4, 3, 0), "Local error; try again later")
    }
    /// ARCHITECTURE.md, "A revoked token is loud, not lossy".
    pub fn needs_login(identity: &str) -> Reply {
        Reply::with(
            451,
            Status(4, 7, 0),
            format!("Mailbox sign-in for \"{identity}\" expired; IT must run: mfd-relay auth login {identity}"),
        )
    }

    /// After DATA: delivered upstream in session (ARCHITECTURE.md, "In-session delivery").
    pub fn delivered(id: MessageId, upstream: &str) -> Reply {
        Reply::with(250, Status(2, 0, 0), format!("OK {id} delivered: {}", sanitize_text(upstream, 200)))
    }
    /// After DATA: durable, and retried from the queue.
    pub fn queued(id: MessageId, why: &str) -> Reply {
        Reply::with(
            250,
            Status(2, 0, 0),
            format!("OK {id} queued; delivery will be retried ({})", sanitize_text(why, 120)),
        )
    }
    /// After DATA: finished without a retry, a bounce reports what was not delivered.
    pub fn reported(id: MessageId, what: &str) -> Reply {
        Reply::with(250, Status(2, 0, 0), format!("OK {id} {}", sanitize_text(what, 160)))
    }
    /// After DATA: durable, and already gone from the queue (dropped by the admin).
    pub fn accepted(id: MessageId) -> Reply {
        Reply::with(250, Status(2, 0, 0), format!("OK {id}"))
    }

    /// The session's error budget is spent (`smtp::session::MAX_ERRORS`).
    pub fn too_many_errors() -> Reply {
        Reply::with(421, Status(4, 7, 0), "Too many errors; closing connection")
    }
    /// RFC 5321 4.5.3.2: the client was silent (or too slow) for too long.
    pub fn timeout(host: &str) -> Reply {
        Reply::with(421, Status(4, 4, 2), format!("{host} timeout exceeded; closing connection"))
    }
    /// A client that spent its budget without becoming a device.
    pub fn non_device_cut_off() -> Reply {
        Reply::with(421, Status(4, 7, 0), "Not a configured device and no login; closing connection")
    }
    /// The listener's connection limits (`smtp::listener`).
    pub fn too_many_connections() -> Reply {
        Reply::with(421, Status(4, 7, 0), "Too many connections; try again later")
    }
    /// RFC 5321 3.8: the relay is stopping.
    pub fn shutting_down(host: &str) -> Reply {
        Reply::with(421, Status(4, 3, 2), format!("{host} shutting down; try again later"))
    }
}
