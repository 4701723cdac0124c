//! `mfd-relay test` and `POST /api/test`: one test message sent exactly as a device would send
//! it (its identity, its `from` rule, its recipient allow-list, the same header rewrite), through
//! the same upstream code as real delivery ([`Upstream::send_traced`]), with each step reported
//! as it finishes: token, connect, tls, auth, mail, rcpt, data, final.
//!
//! A test does not go through the queue: it is never retried or bounced, and its outcome is
//! only what the provider said. It always opens a connection of its own (so that connect, TLS
//! and AUTH are seen), within the identity's connection limit. The relay does not know the
//! address a device puts in its own From, so the test message comes from the identity's
//! mailbox; with `from = "rewrite"` the header rewrite then runs as for the device's mail.

use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::FromPolicy;
use crate::devices::{Device, Devices};
use crate::generation::Generation;
use crate::oauth::tokens::TokenError;
use crate::upstream::api::{NoProgress, Outbound, Progress};
use crate::upstream::trace::{emit, Observer, Step};
use crate::upstream::{Envelope, SendError, UpstreamReply};

/// Largest `size` a test may ask for (the providers' own limits are below it).
pub const MAX_SIZE: u64 = 150 * 1024 * 1024;

/// What to test: `POST /api/test` takes it as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestSend {
    /// The `[[device]]` name.
    pub device: String,
    /// The recipient.
    pub to: String,
    /// Bytes of random data attached as a PDF (none when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// How the test ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResult {
    /// The provider accepted the message.
    pub delivered: bool,
    /// The provider's final reply, or the failing step's.
    pub reply: String,
    /// What the relay would tell a device (and its admin) about that reply.
    pub hint: Option<String>,
}

/// One line of the answer: a step as it finishes, then the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Step(Step),
    Result(TestResult),
}

/// Why a test cannot even start (the API answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TestError {
    #[error("no device \"{0}\" in the configuration")]
    UnknownDevice(String),
    #[error("device \"{device}\" may not send to <{to}> (its `recipients` allow-list)")]
    RecipientRefused { device: String, to: String },
    #[error("<{0}> is not an email address")]
    BadRecipient(String),
    #[error("--size {0} is larger than {MAX_SIZE} bytes")]
    TooBig(u64),
}

/// The device to test as, once the request fits the configuration.
pub fn check(generation: &Generation, req: &TestSend) -> Result<Device, TestError> {
    let devices = Devices::from_config(&generation.config);
    let device = devices
        .all()
        .iter()
        .find(|d| d.name == req.device)
        .ok_or_else(|| TestError::UnknownDevice(req.device.clone()))?;
    let to = req.to.trim();
    if to.parse::<lettre::Address>().is_err() {
        return Err(TestError::BadRecipient(to.to_string()));
    }
    if !device.allows_recipient(to) {
        return Err(TestError::RecipientRefused { device: device.name.clone(), to: to.to_string() });
    }
    if let Some(size) = req.size.filter(|s| *s > MAX_SIZE) {
        return Err(TestError::TooBig(size));
    }
    Ok((**device).clone())
}

/// Sends the test message as `device` through `upstream`, reporting each step to `obs`.
pub async fn run(generation: &Generation, device: &Device, req: &TestSend, obs: &dyn Observer) -> TestResult {
    // One test at a time: a large `size` costs hundreds of MiB while it is built and sent,
    // and the admin API must not be able to multiply that.
    static ONE_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let Ok(_running) = ONE_AT_A_TIME.try_acquire() else {
        return failed("another test message is being sent; try again when it is done".into(), None);
    };
    let upstream = &generation.upstream;
    let identity = device.identity.as_str();
    let tokens = &generation.tokens;
    let started = Instant::now();
    let slot = match tokens.slot(identity) {
        Ok(s) => s.clone(),
        Err(e) => {
            emit(obs, "token", false, started, || e.to_string());
            return failed(e.to_string(), None);
        }
    };
    let expiry_before = expires_at(generation, identity);
    let via = slot.send_via;
    let token = match tokens.access_token_for(identity, crate::delivery::resource_of(via)).await {
        Ok(t) => t,
        Err(e) => {
            emit(obs, "token", false, started, || e.to_string());
            let hint = match &e {
                TokenError::NeedsLogin(_) => format!("sign the identity in again: mfd-relay auth login {identity}"),
                TokenError::Transient(_) => {
                    "the provider's token endpoint could not be reached; the relay retries".into()
                }
                _ => "check the identity's provider settings (mfd-relay check --explain)".into(),
            };
            return failed(e.to_string(), Some(hint));
        }
    };
    emit(obs, "token", true, started, || {
        let how = if expiry_before == Some(token.expires_at) { "cached" } else { "fetched" };
        let left = (token.expires_at - chrono::Utc::now().timestamp()).max(0) / 60;
        format!("{how}, {} for {}, expires in {left} min", identity, token.account)
    });

    let mailbox = slot.email.clone();
    let now = chrono::Utc::now();
    let unique = format!("test.{}.{}", now.timestamp_millis(), std::process::id());
    let text = compose(&device.name, &mailbox, req.to.trim(), req.size.unwrap_or(0), &generation.config.relay.hostname);
    let received = crate::message::received_field(
        "mfd-relay-test",
        "127.0.0.1",
        &generation.config.relay.hostname,
        "ESMTPA",
        &unique,
        now,
    );
    let changes = crate::message::Changes {
        received: &received,
        rewrite_from: (device.from == FromPolicy::Rewrite).then_some(mailbox.as_str()),
        hostname: &generation.config.relay.hostname,
        unique: &unique,
        now,
    };
    let message = match crate::message::rewrite_message(&text, &changes) {
        Ok(m) => m,
        Err(e) => return failed(format!("the test message could not be built: {e}"), None),
    };
    let file = match TempFile::write(&message) {
        Ok(f) => f,
        Err(e) => return failed(format!("cannot write the test message: {e}"), None),
    };
    let rcpts = vec![req.to.trim().to_string()];
    let env = Envelope { from: &mailbox, rcpts: &rcpts, size: message.len() as u64, eight_bit: false };
    let provider = slot.provider.name.clone();
    // Graph and the Gmail API: the same requests as real delivery; nothing to resume, since a
    // test is never queued.
    let msg = Outbound {
        identity,
        mailbox: &mailbox,
        env: &env,
        body: &file.0,
        progress: &Progress::None,
        sink: &NoProgress,
        obs,
    };
    let result = upstream.send_traced(via, &provider, &token, &msg).await;
    match result {
        Ok(out) => match (out.reply, out.refused.into_iter().next()) {
            (Some(reply), _) if !out.accepted.is_empty() => {
                TestResult { delivered: true, reply: format!("{} {}", reply.code, reply.text), hint: None }
            }
            (_, Some((_, r))) => refused(&r),
            _ => failed("the provider accepted no recipient".into(), None),
        },
        Err(SendError::Rejected(r)) => refused(&r),
        Err(SendError::Auth { reply, detail }) => TestResult {
            delivered: false,
            reply: match detail {
                Some(d) => format!("{} {} {d}", reply.code, reply.text),
                None => format!("{} {}", reply.code, reply.text),
            },
            hint: reply.hint().map(str::to_string),
        },
        Err(SendError::Throttled { reply, retry_after }) => failed(
            format!("{} {}", reply.code, reply.text),
            Some(format!(
                "the provider is throttling this mailbox; the relay would keep the message queued and try again in {} s",
                retry_after.as_secs()
            )),
        ),
        Err(SendError::Network(e)) => failed(
            e,
            Some("the provider could not be reached; the relay would keep the message queued and retry".into()),
        ),
    }
}

/// An observer that passes each step on as an [`Event`] (the admin API streams them).
pub struct Channel(pub tokio::sync::mpsc::UnboundedSender<Event>);

impl Observer for Channel {
    fn step(&self, step: Step) {
        let _ = self.0.send(Event::Step(step));
    }
}

fn failed(reply: String, hint: Option<String>) -> TestResult {
    TestResult { delivered: false, reply, hint }
}

fn refused(r: &UpstreamReply) -> TestResult {
    TestResult { delivered: false, reply: format!("{} {}", r.code, r.text), hint: r.hint().map(str::to_string) }
}

/// The identity's token expiry as the token manager knows it now.
fn expires_at(generation: &Generation, identity: &str) -> Option<i64> {
    generation.tokens.status().into_iter().find(|s| s.name == identity).and_then(|s| s.expires_at)
}

/// The test message as the device would hand it over (CRLF line endings), with `size` bytes
/// of random data attached as `mfd-relay-test.pdf` when `size` > 0.
pub fn compose(device: &str, from: &str, to: &str, size: u64, hostname: &str) -> Vec<u8> {
    let mut m = format!(
        "From: \"mfd-relay test ({device})\" <{from}>\r\nTo: <{to}>\r\nSubject: mfd-relay test from device {device}\r\nMIME-Version: 1.0\r\n"
    );
    let text =
        format!("This is a test message from mfd-relay on {hostname}, sent as device \"{device}\" would send it.\r\n");
    if size == 0 {
        m.push_str("Content-Type: text/plain; charset=us-ascii\r\n\r\n");
        m.push_str(&text);
        return m.into_bytes();
    }
    let boundary = format!("mfd-relay-test-{}", chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0));
    m.push_str(&format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n"));
    m.push_str(&format!("--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{text}\r\n"));
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: application/pdf; name=\"mfd-relay-test.pdf\"\r\n\
         Content-Disposition: attachment; filename=\"mfd-relay-test.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ));
    use base64::Engine;
    // RFC 2045 6.8: lines of at most 76 characters, i.e. 57 bytes each; encoded line by line,
    // so that neither the random bytes nor their encoding exist twice in memory.
    m.reserve((size as usize).div_ceil(57) * 78 + 64);
    let mut line = [0u8; 57];
    let mut left = size as usize;
    while left > 0 {
        let n = left.min(57);
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut line[..n]);
        base64::engine::general_purpose::STANDARD.encode_string(&line[..n], &mut m);
        m.push_str("\r\n");
        left -= n;
    }
    m.push_str(&format!("--{boundary}--\r\n"));
    m.into_bytes()
}

/// The message file the upstream streams from, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn write(data: &[u8]) -> std::io::Result<TempFile> {
        use std::io::Write;
        let mut name = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut name);
        let hex: String = name.iter().map(|b| format!("{b:02x}")).collect();
        let path = std::env::temp_dir().join(format!("mfd-relay-test-{hex}.eml"));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&path)?;
        f.write_all(data)?;
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attachment_of_the_size_asked_for() {
        let m = compose("floor3", "scans@contoso.com", "me@contoso.com", 3000, "relay.lan");
        let text = String::from_utf8(m).unwrap();
        assert!(text.contains("filename=\"mfd-relay-test.pdf\""), "{text}");
        let b64: String = text
            .split("Content-Transfer-Encoding: base64\r\n\r\n")
            .nth(1)
            .unwrap()
            .split("\r\n--")
            .next()
            .unwrap()
            .replace("\r\n", "");
        use base64::Engine;
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(b64).unwrap().len(), 3000);
        assert!(text.lines().all(|l| l.len() <= 998));
    }

    #[test]
    fn events_are_one_json_object_each() {
        let step = Event::Step(Step { name: "token".into(), ok: true, ms: 12, detail: "cached".into() });
        assert_eq!(
            serde_json::to_string(&step).unwrap(),
            r#"{"step":{"name":"token","ok":true,"ms":12,"detail":"cached"}}"#
        );
        let result = Event::Result(TestResult { delivered: true, reply: "250 2.0.0 OK".into(), hint: None });
        assert_eq!(
            serde_json::to_string(&result).unwrap(),
            r#"{"result":{"delivered":true,"reply":"250 2.0.0 OK","hint":null}}"#
        );
    }
}
