//! A message a device just sent: its queue record is built here, and committed by
//! [`Queue::accept_incoming`] (ARCHITECTURE.md, "Durability": only then may the device get 250).

use super::{now_ms, Lease, MessageId, Queue, QueueError, QueueRecord};

/// What the session knows of a message whose body is finished in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub id: MessageId,
    /// The device's name.
    pub device: String,
    /// The identity the device sends as.
    pub identity: String,
    /// The device's address, for logs.
    pub client: String,
    /// The envelope sender the device gave ("" for the null sender).
    pub from: String,
    /// The identity's mailbox when the device's `from = "rewrite"` policy replaces the
    /// envelope sender upstream.
    pub rewrite_from: Option<String>,
    /// The device's own sender passed its recipient allow-list, so it may receive bounces.
    pub bounce_to_sender: bool,
    /// The mail recipients.
    pub rcpts: Vec<String>,
    /// The recipients that stand for a folder (scan to folder): each becomes a record of its own.
    pub folders: Vec<ForFolder>,
    /// Bytes in the spool (after the header rewrite).
    pub size: u64,
    /// The body has bytes >= 0x80 (BODY=8BITMIME upstream, RFC 6152).
    pub eight_bit: bool,
}

/// A recipient that stands for a `[[destination]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForFolder {
    /// The address the device sent to.
    pub address: String,
    /// The destination's name.
    pub destination: String,
    /// The identity whose token saves its files.
    pub identity: String,
}

impl Incoming {
    /// The queue records of the message, due now, never attempted: one for the mail
    /// recipients (if any), then one per folder recipient; the first has the message's id,
    /// the others ids from `new_id`.
    pub fn records(&self, mut new_id: impl FnMut() -> MessageId) -> Vec<QueueRecord> {
        let mut out = Vec::with_capacity(1 + self.folders.len());
        if !self.rcpts.is_empty() {
            out.push(self.record());
        }
        for f in &self.folders {
            let id = if out.is_empty() { self.id } else { new_id() };
            out.push(QueueRecord {
                id,
                identity: f.identity.clone(),
                rcpts: vec![f.address.clone()],
                destination: Some(f.destination.clone()),
                ..self.record()
            });
        }
        out
    }

    /// The queue record of the mail recipients: due now, never attempted.
    pub fn record(&self) -> QueueRecord {
        let now = now_ms();
        QueueRecord {
            id: self.id,
            received: now / 1000,
            device: self.device.clone(),
            identity: self.identity.clone(),
            client: self.client.clone(),
            from: self.rewrite_from.clone().unwrap_or_else(|| self.from.clone()),
            original_from: self.from.clone(),
            bounce_to_sender: self.bounce_to_sender && !self.from.is_empty(),
            rcpts: self.rcpts.clone(),
            size: self.size,
            eight_bit: self.eight_bit,
            attempts: 0,
            next_attempt: now,
            last_error: None,
            is_bounce: false,
            progress: crate::upstream::api::Progress::None,
            destination: None,
        }
    }
}

impl Queue {
    /// Commits an incoming message's records (its body must be finished in the spool); on
    /// failure the body is removed, since the device will be told to send it again. Like
    /// [`Queue::accept`], each record is left in flight for the in-session attempt.
    pub async fn accept_incoming(&self, m: &Incoming) -> Result<Vec<Lease>, QueueError> {
        let records = m.records(|| self.new_id());
        match self.accept_all(&records).await {
            Ok(leases) => Ok(leases),
            Err(e) => {
                self.spool().remove(m.id);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming() -> Incoming {
        Incoming {
            id: MessageId(7),
            device: "scanner".into(),
            identity: "scans".into(),
            client: "192.0.2.7".into(),
            from: "panel@printer.local".into(),
            rewrite_from: None,
            bounce_to_sender: true,
            rcpts: vec!["a@example.com".into()],
            folders: Vec::new(),
            size: 10,
            eight_bit: false,
        }
    }

    #[test]
    fn the_record_keeps_the_device_sender_unless_rewritten() {
        let r = incoming().record();
        assert_eq!((r.from.as_str(), r.original_from.as_str()), ("panel@printer.local", "panel@printer.local"));
        assert!(r.bounce_to_sender && !r.is_bounce && r.attempts == 0);
        let r = Incoming { rewrite_from: Some("scans@contoso.com".into()), ..incoming() }.record();
        assert_eq!((r.from.as_str(), r.original_from.as_str()), ("scans@contoso.com", "panel@printer.local"));
        // The null sender never gets bounces.
        let r = Incoming { from: String::new(), ..incoming() }.record();
        assert!(!r.bounce_to_sender);
    }

    #[test]
    fn each_folder_recipient_is_a_record_of_its_own_under_the_destination_s_identity() {
        let folder =
            |a: &str, d: &str| ForFolder { address: a.into(), destination: d.into(), identity: "files".into() };
        let m = Incoming {
            folders: vec![folder("finance@scan.lan", "finance"), folder("hr@scan.lan", "hr")],
            ..incoming()
        };
        let mut next = 100;
        let rs = m.records(|| {
            next += 1;
            MessageId(next)
        });
        let ids: Vec<u64> = rs.iter().map(|r| r.id.0).collect();
        assert_eq!(ids, vec![7, 101, 102]);
        assert_eq!((rs[0].identity.as_str(), rs[0].destination.as_deref()), ("scans", None));
        assert_eq!(rs[0].rcpts, vec!["a@example.com"]);
        assert_eq!((rs[1].identity.as_str(), rs[1].destination.as_deref()), ("files", Some("finance")));
        assert_eq!(rs[1].rcpts, vec!["finance@scan.lan"]);
        assert_eq!(rs[2].rcpts, vec!["hr@scan.lan"]);
        // Only folder recipients: the first folder record keeps the message's id and body.
        let m = Incoming { rcpts: vec![], folders: vec![folder("finance@scan.lan", "finance")], ..incoming() };
        let rs = m.records(|| unreachable!("no second record"));
        assert_eq!((rs.len(), rs[0].id.0, rs[0].destination.as_deref()), (1, 7, Some("finance")));
    }
}
