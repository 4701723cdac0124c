//! Google Drive through the Drive API v3 (module [`super`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Saved, Target, Upload};
use crate::oauth::tokens::AccessToken;
use crate::upstream::SendError;

/// What a file's upload leaves to resume (committed before each step).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Step {}

/// The Google Drive API.
pub struct DriveApi {}

impl DriveApi {
    /// `base_url`: the Drive API (`https://www.googleapis.com`); `ca_file`: extra CAs.
    pub fn new(_base_url: &str, _ca_file: Option<&Path>) -> Result<DriveApi, String> {
        Ok(DriveApi {})
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
