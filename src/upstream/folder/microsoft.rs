//! SharePoint and OneDrive through Microsoft Graph's drives (module [`super`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Saved, Target, Upload};
use crate::oauth::tokens::AccessToken;
use crate::upstream::SendError;

/// What a file's upload leaves to resume (committed before each step).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Step {}

/// Microsoft Graph's drive endpoints.
pub struct GraphDrive {}

impl GraphDrive {
    /// `base_url`: the provider's Graph (`https://graph.microsoft.com`); `ca_file`: extra CAs.
    pub fn new(_base_url: &str, _ca_file: Option<&Path>) -> Result<GraphDrive, String> {
        Ok(GraphDrive {})
    }

    /// Saves one file in the target's folder.
    pub async fn save(&self, _token: &AccessToken, _up: &Upload<'_, Step>) -> Result<Saved, SendError> {
        Err(SendError::Network("not yet".into()))
    }

    /// An organisation-scoped view link to a saved file.
    pub async fn share(&self, _token: &AccessToken, _target: &Target, _saved: &Saved) -> Result<String, SendError> {
        Err(SendError::Network("not yet".into()))
    }
}
