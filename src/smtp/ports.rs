//! What a session needs from the rest of the relay, as narrow traits: [`Verify`] (who is
//! this: devices by address and by login), [`Identities`] (what the session must know of a
//! device's identity), [`Accept`] (make a message durable) and [`Attempt`] (the in-session
//! delivery). The real types implement them here; the in-process session tests
//! (`smtp::transcripts`) implement them with fakes, so a whole conversation runs in memory.

use std::net::IpAddr;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::delivery::{Delivery, Outcome};
use crate::devices::{AuthError, Device, Devices};
use crate::oauth::tokens::{IdentityState, TokenManager};
use crate::queue::{Incoming, Lease, MessageId, Queue, QueueError, SpoolWriter};
use crate::reply::Reply;
use crate::upstream::Upstream;

/// Who a connection is (ARCHITECTURE.md, "Never an open relay").
pub trait Verify: Send + Sync {
    /// The device a connection from `ip` is when it does not log in.
    fn by_address(&self, ip: IpAddr) -> Option<Arc<Device>>;
    /// After a reload: the current version of a device that logged in earlier, if its login
    /// still holds.
    fn still_logged_in(&self, old: &Device, ip: IpAddr) -> Option<Arc<Device>>;
    /// The device name of a username (for the activity page).
    fn name_of_user(&self, username: &str) -> Option<String>;
    /// Checks AUTH credentials.
    fn authenticate<'a>(
        &'a self,
        username: &'a str,
        pin: &'a str,
        ip: IpAddr,
    ) -> BoxFuture<'a, Result<Arc<Device>, AuthError>>;
    /// The identities the devices use, each once (for the SIZE advertised before the client
    /// is known).
    fn identities(&self) -> &[String];
}

/// What the session must know of an identity.
pub trait Identities: Send + Sync {
    /// The identity's mailbox address, `None` when it is not configured.
    fn email(&self, identity: &str) -> Option<String>;
    /// The largest message the identity's provider takes, if it has a limit.
    fn size_limit(&self, identity: &str) -> Option<u64>;
    /// Its sign-in was revoked (ARCHITECTURE.md, "A revoked token is loud, not lossy").
    fn needs_login(&self, identity: &str) -> bool;
}

/// Where a message body goes while DATA is received.
pub trait BodySink: Send {
    /// Appends bytes.
    fn write<'a>(&'a mut self, bytes: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>>;
    /// Bytes written so far.
    fn written(&self) -> u64;
    /// Makes the body durable (ARCHITECTURE.md, "Durability").
    fn finish(self: Box<Self>) -> BoxFuture<'static, std::io::Result<()>>;
    /// Throws the body away.
    fn abort(self: Box<Self>);
}

/// Makes a message durable: the queue.
pub trait Accept: Send + Sync {
    /// A new message id.
    fn new_id(&self) -> MessageId;
    /// Where the body of message `id` is written.
    fn body(&self, id: MessageId) -> Box<dyn BodySink>;
    /// Where the finished body of message `id` is, when it is a file (the folder check reads
    /// it); `None` for a body kept elsewhere.
    fn spooled(&self, id: MessageId) -> Option<std::path::PathBuf>;
    /// Throws away the finished body of a message that will not be queued.
    fn discard(&self, id: MessageId);
    /// Commits the records of a message whose body is finished (one for its mail
    /// recipients, one per folder recipient), and holds them for the in-session attempt; on
    /// failure the body is gone.
    fn accept<'a>(&'a self, m: &'a Incoming) -> BoxFuture<'a, Result<Vec<Lease>, QueueError>>;
}

/// The in-session delivery attempt (ARCHITECTURE.md, "In-session delivery").
pub trait Attempt: Send + Sync {
    /// Attempts a just-accepted message's records while the device waits.
    fn attempt_in_session(self: Arc<Self>, leases: Vec<Lease>) -> BoxFuture<'static, Outcome>;
}

/// The recipients that stand for a cloud folder (`[[destination]]`, scan to folder).
pub trait Destinations: Send + Sync {
    /// The destination a recipient address stands for: its name and the identity that
    /// saves its files.
    fn by_address(&self, address: &str) -> Option<(String, String)>;
    /// Whether any destination is configured.
    fn any(&self) -> bool;
    /// Whether a device whose allow-list says `allows` may send to some destination.
    fn reachable(&self, allows: &dyn Fn(&str) -> bool) -> bool;
    /// The refusal of a message spooled at `body` that has nothing to save for any of the
    /// destinations `addresses` stand for (no attachment, no `save_body`); `None` when one of
    /// them has something (or the body cannot be read: delivery decides then).
    fn nothing_to_save<'a>(
        &'a self,
        addresses: &'a [String],
        body: &'a std::path::Path,
    ) -> BoxFuture<'a, Option<Reply>>;
}

impl Destinations for crate::upstream::folder::Folders {
    fn by_address(&self, address: &str) -> Option<(String, String)> {
        crate::upstream::folder::Folders::by_address(self, address).map(|d| (d.name.clone(), d.identity.clone()))
    }
    fn any(&self) -> bool {
        !self.is_empty()
    }
    fn reachable(&self, allows: &dyn Fn(&str) -> bool) -> bool {
        self.addresses().any(allows)
    }
    fn nothing_to_save<'a>(
        &'a self,
        addresses: &'a [String],
        body: &'a std::path::Path,
    ) -> BoxFuture<'a, Option<Reply>> {
        Box::pin(async move {
            let dests: Vec<_> = addresses
                .iter()
                .filter_map(|a| crate::upstream::folder::Folders::by_address(self, a).cloned())
                .collect();
            let first = dests.first()?.name.clone();
            let path = body.to_path_buf();
            let any = tokio::task::spawn_blocking(move || {
                dests.iter().any(|d| crate::upstream::folder::Folders::has_files(d, &path).unwrap_or(true))
            })
            .await
            .unwrap_or(true);
            (!any).then(|| crate::upstream::folder::nothing_to_save(&first).to_device_reply())
        })
    }
}

impl Verify for Devices {
    fn by_address(&self, ip: IpAddr) -> Option<Arc<Device>> {
        Devices::by_address(self, ip)
    }
    fn still_logged_in(&self, old: &Device, ip: IpAddr) -> Option<Arc<Device>> {
        Devices::still_logged_in(self, old, ip)
    }
    fn name_of_user(&self, username: &str) -> Option<String> {
        Devices::name_of_user(self, username).map(str::to_string)
    }
    fn authenticate<'a>(
        &'a self,
        username: &'a str,
        pin: &'a str,
        ip: IpAddr,
    ) -> BoxFuture<'a, Result<Arc<Device>, AuthError>> {
        Box::pin(Devices::authenticate(self, username, pin, ip))
    }
    fn identities(&self) -> &[String] {
        Devices::identities(self)
    }
}

/// The identities as a session sees them: the token manager's, with each provider's size limit
/// as its server advertised it ([`crate::oauth::provider::ProviderInfo::size_limit`]).
pub struct SessionIdentities {
    pub tokens: Arc<TokenManager>,
    pub upstream: Arc<Upstream>,
    /// Identities with `oversize = "link"`: a message over their provider's limit is
    /// accepted (its attachments become links), so no provider limit is advertised for them.
    pub oversize_link: std::collections::HashSet<String>,
}

impl Identities for SessionIdentities {
    fn email(&self, identity: &str) -> Option<String> {
        self.tokens.slot(identity).ok().map(|s| s.email.clone())
    }
    fn size_limit(&self, identity: &str) -> Option<u64> {
        if self.oversize_link.contains(identity) {
            return None;
        }
        let slot = self.tokens.slot(identity).ok()?;
        self.upstream.size_limit(&slot.provider, slot.send_via)
    }
    fn needs_login(&self, identity: &str) -> bool {
        self.tokens.state(identity) == Some(IdentityState::NeedsLogin)
    }
}

impl BodySink for SpoolWriter {
    fn write<'a>(&'a mut self, bytes: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(SpoolWriter::write(self, bytes))
    }
    fn written(&self) -> u64 {
        SpoolWriter::len(self)
    }
    fn finish(self: Box<Self>) -> BoxFuture<'static, std::io::Result<()>> {
        Box::pin(SpoolWriter::finish(*self))
    }
    fn abort(self: Box<Self>) {
        SpoolWriter::abort(*self)
    }
}

impl Accept for Queue {
    fn new_id(&self) -> MessageId {
        Queue::new_id(self)
    }
    fn body(&self, id: MessageId) -> Box<dyn BodySink> {
        Box::new(self.spool().writer(id))
    }
    fn spooled(&self, id: MessageId) -> Option<std::path::PathBuf> {
        Some(self.spool().path(id))
    }
    fn discard(&self, id: MessageId) {
        self.spool().remove(id);
    }
    fn accept<'a>(&'a self, m: &'a Incoming) -> BoxFuture<'a, Result<Vec<Lease>, QueueError>> {
        Box::pin(self.accept_incoming(m))
    }
}

impl Attempt for Delivery {
    fn attempt_in_session(self: Arc<Self>, leases: Vec<Lease>) -> BoxFuture<'static, Outcome> {
        Box::pin(async move { Delivery::attempt_in_session(&self, leases).await })
    }
}
