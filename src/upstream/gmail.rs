//! Sending through the Gmail API (stub: being written).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::api::ApiMessage;
use super::client::{SendError, SendOutcome};
use crate::oauth::tokens::AccessToken;

/// What a Gmail API send leaves to resume after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resume {}

/// A Gmail API endpoint (one per provider).
pub struct Gmail {
    base: String,
}

impl Gmail {
    /// `base_url`: e.g. `https://gmail.googleapis.com`; `ca_file`: extra CAs to trust.
    pub fn new(base_url: &str, _ca_file: Option<&Path>) -> Result<Gmail, String> {
        Ok(Gmail { base: base_url.to_string() })
    }

    /// Sends `msg` as `msg.mailbox` with a Gmail token, to exactly the envelope's recipients.
    pub async fn send(&self, _token: &AccessToken, _msg: &ApiMessage<'_>) -> Result<SendOutcome, SendError> {
        Err(SendError::Network(format!("the Gmail API at {} is not written yet", self.base)))
    }
}
