//! Sending through Microsoft Graph (stub: being written).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::api::ApiMessage;
use super::client::{SendError, SendOutcome};
use crate::oauth::tokens::AccessToken;

/// What a Graph send leaves to resume after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resume {}

/// A Graph endpoint (one per provider).
pub struct Graph {
    base: String,
}

impl Graph {
    /// `base_url`: e.g. `https://graph.microsoft.com`; `ca_file`: extra CAs to trust.
    pub fn new(base_url: &str, _ca_file: Option<&Path>) -> Result<Graph, String> {
        Ok(Graph { base: base_url.to_string() })
    }

    /// Sends `msg` as `msg.mailbox` with a Graph token, to exactly the envelope's recipients.
    pub async fn send(&self, _token: &AccessToken, _msg: &ApiMessage<'_>) -> Result<SendOutcome, SendError> {
        Err(SendError::Network(format!("Graph at {} is not written yet", self.base)))
    }
}
