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
    pub rcpts: Vec<String>,
    /// Bytes in the spool (after the header rewrite).
    pub size: u64,
    /// The body has bytes >= 0x80 (BODY=8BITMIME upstream, RFC 6152).
    pub eight_bit: bool,
}

impl Incoming {
    /// The queue record: due now, never attempted.
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
        }
    }
}

impl Queue {
    /// Commits an incoming message's record (its body must be finished in the spool); on
    /// failure the body is removed, since the device will be told to send it again. Like
    /// [`Queue::accept`], the message is left in flight for the in-session attempt.
    pub async fn accept_incoming(&self, m: &Incoming) -> Result<Lease, QueueError> {
        let rec = m.record();
        match self.accept(&rec).await {
            Ok(lease) => Ok(lease),
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
}
