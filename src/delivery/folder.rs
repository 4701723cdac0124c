//! Scan to folder in delivery: a queue record whose one recipient is a `[[destination]]`
//! (ARCHITECTURE.md, "Scan to folder"). It is attempted, retried, throttled, expired and
//! bounced like mail; only the attempt differs: the message's files are saved with the
//! destination identity's Graph token (SharePoint, OneDrive) or its Google token (Drive),
//! each upload's state committed in the record as it goes (`Progress::Folder`), and a
//! receipt may go to the sender.

use std::fmt::Write as _;
use std::time::Instant;

use super::*;
use crate::upstream::folder::{nothing_to_save, Destination, FilePlan, Job, Resume, Saved, StepSink};

/// Commits a folder job's [`Resume`] in its queue record (through the record's progress).
struct FolderSink<'a>(&'a RecordProgress<'a>);

impl StepSink<Resume> for FolderSink<'_> {
    fn save<'a>(
        &'a self,
        step: &'a Resume,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move { self.0.save(&Progress::Folder(step.clone())).await })
    }
}

/// Why a folder job could not start: (record, why, cap on the wait, class).
type NotStarted = (QueueRecord, String, Option<Duration>, DeferReason);

impl Delivery {
    /// Saves `rec`'s files to `dest` with the destination identity's token (refreshed once
    /// if refused), continuing and keeping the upload state in `rec.progress`. Returns the
    /// result and the record with its latest progress, or why nothing started.
    async fn save_files(
        &self,
        lease: &Lease,
        rec: QueueRecord,
        dest: &Destination,
        plan: &FilePlan,
        links: bool,
    ) -> (Result<Vec<Saved>, SendError>, Result<QueueRecord, NotStarted>) {
        // SharePoint and OneDrive take Graph's token; a Google identity's one token serves
        // the Drive API (`TokenManager` resolves it).
        let resource = Resource::Graph;
        let token = match self.tokens.access_token_for(&dest.identity, resource).await {
            Ok(t) => t,
            Err(TokenError::NeedsLogin(why)) => {
                let why = format!("identity needs a new sign-in: {why}");
                let cap = Some(Duration::from_secs(300));
                return (Ok(vec![]), Err((rec, why, cap, DeferReason::NeedsLogin)));
            }
            Err(e) => return (Ok(vec![]), Err((rec, e.to_string(), None, DeferReason::Token))),
        };
        let progress = RecordProgress::new(&self.queue, lease, &rec);
        let save = |token: AccessToken| {
            let progress = &progress;
            async move {
                let resume = match progress.latest() {
                    Progress::Folder(r) => r,
                    _ => Resume::default(),
                };
                let sink = FolderSink(progress);
                let job = Job { dest, resume: &resume, sink: &sink, links };
                self.folders.save(&token, &job, plan).await
            }
        };
        let mut result = save(token.clone()).await;
        if let Err(SendError::Auth { reply, .. }) = &result {
            tracing::warn!(queue_id = %rec.id, identity = %dest.identity, "the folder's service refused the token ({}); refreshing once", reply.describe());
            match self.tokens.refresh_after_rejection_for(&dest.identity, resource, &token).await {
                Ok(t2) => result = save(t2).await,
                Err(e) => tracing::warn!(identity = %dest.identity, "refresh after rejection failed: {e}"),
            }
        }
        let latest = progress.into_latest();
        let mut rec = rec;
        rec.progress = latest;
        (result, Ok(rec))
    }

    /// An oversize message of an identity with `oversize = "link"`: its attachments are saved
    /// to destination `name` with an organisation-scoped view link each, then the message is
    /// replaced in the queue by the same mail with a text part listing the links instead of
    /// the attachments ([`crate::message::links`]), which the next attempt sends.
    pub(super) async fn attempt_oversize(
        &self,
        mut lease: Lease,
        rec: QueueRecord,
        name: &str,
        limit: u64,
        waiter: Option<&Waiter>,
    ) -> Outcome {
        let id = rec.id;
        let Some(dest) = self.folders.by_name(name).cloned() else {
            let why = format!("oversize_destination \"{name}\" is not configured; message kept");
            return self.defer(lease, rec, &why, None, DeferReason::Config);
        };
        let path = self.queue.spool().path(id);
        if rec.progress.is_none() {
            // Nothing is saved for a message that would still be too big without its
            // attachments (a huge body, files inside nested parts).
            let p = path.clone();
            let rest = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
                let src = crate::upstream::folder::Spooled::open(&p)?;
                let parts = crate::message::attachments::find(&src)?;
                let all: Vec<_> = parts.attachments.iter().collect();
                Ok(crate::message::attachments::without(&src, &parts, &all)?.len() as u64)
            })
            .await;
            if let Ok(Ok(rest)) = rest {
                // Room for the links part: a line per file.
                if rest + LINKS_ROOM > limit {
                    let r = UpstreamReply::new(
                        552,
                        format!(
                            "5.3.4 the message is over the provider's size limit ({limit} bytes) even without its attachments"
                        ),
                    );
                    return self
                        .failed(lease, rec, SendError::Rejected(r), waiter, Duration::ZERO, "folder", false)
                        .await;
                }
            }
        }
        let started = Instant::now();
        let plan = match FilePlan::read(&dest, &path, rec.received, &rec.device, &id.to_string()).await {
            Ok(plan) => plan,
            Err(e) => return self.defer(lease, rec, &e.to_string(), None, DeferReason::Config),
        };
        let (result, rec) = self.save_files(&lease, rec, &dest, &plan, true).await;
        let rec = match rec {
            Ok(rec) => rec,
            Err((rec, why, cap, class)) => return self.defer(lease, rec, &why, cap, class),
        };
        let took = started.elapsed();
        let saved = match result {
            Ok(saved) => saved,
            Err(SendError::Rejected(r)) if r.status().is_some_and(|s| (s.0, s.1, s.2) == (5, 6, 0)) => {
                // Nothing to save: it is simply too big.
                let r = UpstreamReply::new(
                    552,
                    "5.3.4 the message is over the provider's size limit and has no attachment to send as a link",
                );
                return self.failed(lease, rec, SendError::Rejected(r), waiter, took, "folder", false).await;
            }
            Err(e) => return self.failed(lease, rec, e, waiter, took, "folder", false).await,
        };
        let bytes: u64 = saved.iter().map(|s| s.size).sum();
        metrics::FILES_SAVED.with_label_values(&[&dest.name, dest.kind.as_str()]).inc_by(saved.len() as u64);
        metrics::FILE_BYTES_SAVED.with_label_values(&[&dest.name]).inc_by(bytes);
        let text = links_text(&dest, &saved);
        let (p, unique) = (path.clone(), id.to_string());
        let body = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let src = crate::upstream::folder::Spooled::open(&p)?;
            let parts = crate::message::attachments::find(&src)?;
            let all: Vec<_> = parts.attachments.iter().collect();
            let rest = crate::message::attachments::without(&src, &parts, &all)?;
            Ok(crate::message::links::with_links(&rest, &text, &unique))
        })
        .await;
        let body = match body {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                return self.defer(
                    lease,
                    rec,
                    &format!("cannot rewrite the message with links: {e}"),
                    None,
                    DeferReason::Config,
                )
            }
            Err(e) => {
                return self.defer(
                    lease,
                    rec,
                    &format!("cannot rewrite the message with links: {e}"),
                    None,
                    DeferReason::Config,
                )
            }
        };
        let new = QueueRecord {
            id: self.queue.new_id(),
            size: body.len() as u64,
            eight_bit: !body.is_ascii(),
            progress: Progress::None,
            next_attempt: now_ms(),
            ..rec.clone()
        };
        if let Err(e) = self.queue.replace(&mut lease, &new, &body).await {
            tracing::error!(queue_id = %id, "cannot queue the mail with links: {e}");
            return Outcome::Queued("the mail with links could not be queued; it will be retried".into());
        }
        tracing::info!(
            queue_id = %id, new_id = %new.id, identity = %rec.identity, destination = %dest.name, files = saved.len(),
            bytes, size = new.size, ms = took.as_millis() as u64, "oversize message: files saved, the mail now carries links"
        );
        Outcome::Queued(format!(
            "over the provider's size limit: {} file(s) saved to \"{}\", the mail with their links is queued as {}",
            saved.len(),
            dest.name,
            new.id
        ))
    }

    /// One attempt of a folder record: saves its files to destination `name`.
    pub(super) async fn attempt_folder(
        &self,
        lease: Lease,
        rec: QueueRecord,
        name: &str,
        waiter: Option<&Waiter>,
    ) -> Outcome {
        let id = rec.id;
        let found = self.folders.by_name(name).or_else(|| rec.rcpts.first().and_then(|a| self.folders.by_address(a)));
        let Some(dest) = found.cloned() else {
            let why = format!("folder destination \"{name}\" is no longer configured; message kept");
            tracing::error!(queue_id = %id, "{why}");
            return self.defer(lease, rec, &why, None, DeferReason::Config);
        };
        let path = self.queue.spool().path(id);
        // The message is read once per attempt; nothing to save is known before any token
        // or request, so a device that waits hears 550 5.6.0 at once.
        let plan = match FilePlan::read(&dest, &path, rec.received, &rec.device, &id.to_string()).await {
            Ok(plan) => plan,
            Err(e) => return self.defer(lease, rec, &e.to_string(), None, DeferReason::Config),
        };
        if plan.is_empty() {
            let refused = SendOutcome {
                accepted: vec![],
                refused: rec.rcpts.iter().map(|a| (a.clone(), nothing_to_save(&dest.name))).collect(),
                reply: None,
            };
            return self.settle(lease, rec, refused, waiter, Duration::ZERO, "folder").await;
        }
        let started = Instant::now();
        let (result, rec) = self.save_files(&lease, rec, &dest, &plan, false).await;
        let rec = match rec {
            Ok(rec) => rec,
            Err((rec, why, cap, class)) => return self.defer(lease, rec, &why, cap, class),
        };
        let took = started.elapsed();
        match result {
            Ok(saved) => {
                let bytes: u64 = saved.iter().map(|s| s.size).sum();
                metrics::FILES_SAVED.with_label_values(&[&dest.name, dest.kind.as_str()]).inc_by(saved.len() as u64);
                metrics::FILE_BYTES_SAVED.with_label_values(&[&dest.name]).inc_by(bytes);
                tracing::info!(queue_id = %id, device = %rec.device, destination = %dest.name, files = saved.len(), bytes, ms = took.as_millis() as u64, "saved to folder");
                if dest.receipt {
                    self.send_receipt(&rec, &dest, &saved).await;
                }
                let text = crate::upstream::folder::describe(&dest, &saved);
                let out = SendOutcome {
                    accepted: rec.rcpts.clone(),
                    refused: vec![],
                    reply: Some(UpstreamReply::new(250, format!("2.0.0 {text}"))),
                };
                self.settle(lease, rec, out, waiter, took, "folder").await
            }
            Err(e) => self.failed(lease, rec, e, waiter, took, "folder", false).await,
        }
    }

    /// Queues the receipt of a saved scan: one mail to the device's sender, through the
    /// destination's identity, naming each file with its size and link. Only to a sender
    /// that passed the device's recipient allow-list and is in the identity's own domain: a
    /// receipt carries the library's links and names the device chose, so a device (or
    /// anything on the LAN that passes for one) must not make the relay mail them to an
    /// outside address. A receipt that cannot be queued is logged, never retried: the files
    /// are saved.
    async fn send_receipt(&self, rec: &QueueRecord, dest: &Destination, saved: &[Saved]) {
        let Ok(slot) = self.tokens.slot(&dest.identity) else { return };
        if !rec.bounce_to_sender || rec.original_from.is_empty() || !same_domain(&rec.original_from, &slot.email) {
            tracing::warn!(
                queue_id = %rec.id, destination = %dest.name,
                "no receipt: the device's sender is not an allowed recipient in the identity's own domain"
            );
            return;
        }
        let body = receipt(&slot.email, &rec.original_from, dest, saved, &rec.device, &self.policy.hostname, rec.id.0);
        let own = OwnMessage {
            body: &body,
            identity: &dest.identity,
            device: &rec.device,
            from: &slot.email,
            to: &rec.original_from,
        };
        match self.queue.enqueue_own(own).await {
            Ok(rid) => tracing::info!(queue_id = %rec.id, receipt_id = %rid, to = %rec.original_from, "receipt queued"),
            Err(e) => tracing::error!(queue_id = %rec.id, "cannot queue the receipt: {e}"),
        }
    }
}

/// The text part of an oversize mail: each file's name, size and link.
fn links_text(dest: &Destination, saved: &[Saved]) -> String {
    let mut t = format!(
        "This scan was too large to send by mail. Its {} file(s) were saved to \"{}\":\n\n",
        saved.len(),
        dest.name
    );
    // Every link: the recipients have nothing else.
    for s in saved {
        let link = s.link.as_deref().unwrap_or(&s.web_url);
        let _ = write!(t, "{} ({})\n  {}\n", one_line(&s.name), human_size(s.size), one_line(link));
    }
    t
}

/// Whether two addresses are in the same domain (case-insensitive).
pub(super) fn same_domain(a: &str, b: &str) -> bool {
    let domain = |x: &str| x.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
    matches!((domain(a), domain(b)), (Some(x), Some(y)) if x == y)
}

/// What the links part of an oversize mail may take.
const LINKS_ROOM: u64 = 64 * 1024;

/// Files a receipt or a links text lists; the rest are counted.
const LISTED: usize = 100;

/// Bytes as a person reads them.
fn human_size(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{} KB", n.div_ceil(1 << 10)),
        n => format!("{n} bytes"),
    }
}

/// The receipt mail (RFC 5322, CRLF; an automatic message, RFC 3834).
fn receipt(
    from: &str,
    to: &str,
    dest: &Destination,
    saved: &[Saved],
    device: &str,
    host: &str,
    unique: u64,
) -> Vec<u8> {
    let now = chrono::Utc::now();
    let subject = format!("Scan saved: {} file(s) in {}", saved.len(), dest.name);
    let host = host.replace(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'), "-");
    let mut m = String::new();
    let _ = write!(
        m,
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {}\r\nDate: {}\r\nMessage-ID: <receipt.{unique}.{}@{host}>\r\n\
         Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\n",
        crate::message::header_text(&subject),
        now.to_rfc2822(),
        now.timestamp(),
    );
    let _ = write!(m, "The scan from {device} was saved to {} \"{}\":\r\n\r\n", dest.kind, dest.name);
    for s in saved.iter().take(LISTED) {
        let _ = write!(m, "{} ({})\r\n  {}\r\n", one_line(&s.name), human_size(s.size), one_line(&s.web_url));
    }
    if saved.len() > LISTED {
        let _ = write!(m, "... and {} more\r\n", saved.len() - LISTED);
    }
    m.into_bytes()
}

fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_stay_in_the_identity_s_domain() {
        assert!(same_domain("Alice@Contoso.com", "scans@contoso.com"));
        assert!(!same_domain("victim@example.net", "scans@contoso.com"));
        assert!(!same_domain("no-at-sign", "scans@contoso.com"));
    }

    #[test]
    fn a_receipt_names_each_file_with_its_size_and_link() {
        let dest = Destination {
            name: "finance".into(),
            address: "finance@scan.lan".into(),
            identity: "scans".into(),
            provider: "m365".into(),
            kind: crate::config::DestinationKind::Sharepoint,
            target: crate::upstream::folder::Target::Sharepoint {
                site: "c.sharepoint.com:/sites/F".into(),
                library: None,
            },
            folder: crate::filenames::Template::parse("Scans").expect("template"),
            file_name: crate::filenames::Template::parse("{name}").expect("template"),
            conflict: crate::config::Conflict::Rename,
            receipt: true,
            save_body: false,
        };
        let saved = vec![Saved {
            id: "1".into(),
            name: "scan\r\nBcc: x@evil.test.pdf".into(),
            size: 3 << 20,
            web_url: "https://c.sharepoint.com/sites/F/Scans/scan.pdf".into(),
            link: None,
        }];
        let m = String::from_utf8(receipt("scans@c.test", "alice@c.test", &dest, &saved, "mfp-1", "relay", 7)).unwrap();
        let (head, body) = m.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains("Subject: Scan saved: 1 file(s) in finance")
                && head.contains("Auto-Submitted: auto-generated")
        );
        assert!(!head.contains("Bcc"), "{head}");
        assert!(body.contains("3.0 MB") && body.contains("https://c.sharepoint.com/sites/F/Scans/scan.pdf"), "{body}");
        assert!(!body.contains("\r\nBcc"), "a name cannot start a line: {body}");
    }
}
