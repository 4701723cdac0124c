//! Scan to folder: a recipient address that stands for a cloud folder (`[[destination]]`).
//! A message sent there is a queued job like mail (ARCHITECTURE.md, "Scan to folder"): its
//! attachments become files in a SharePoint library, a OneDrive or a Google Drive folder,
//! each uploaded in ranges whose state is committed in the queue record before the range
//! goes, so a crash or restart continues the same upload session instead of saving the file
//! twice.
//!
//! The backends ([`microsoft`]: SharePoint and OneDrive through Microsoft Graph; [`google`]:
//! the Drive API) each save one file ([`Upload`]) and make an organisation-scoped view link
//! to it; this module decides which files a message makes, names them and runs the job.

pub mod google;
pub mod microsoft;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::config::Conflict;

/// Where a destination's files go, as the backends need it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A SharePoint Online site (`host:/sites/path`) and a document library by name (`None`:
    /// the site's default library).
    Sharepoint { site: String, library: Option<String> },
    /// The OneDrive for Business of `user` (a UPN or mail address).
    Onedrive { user: String },
    /// A Google Drive folder by id (`root`: My Drive); shared drives too.
    GoogleDrive { folder_id: String },
}

/// One file to save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFile {
    /// The folder under the target, one safe name per level (empty: the target itself);
    /// created when missing.
    pub folder: Vec<String>,
    /// The file's safe name.
    pub name: String,
    /// `type/subtype`.
    pub content_type: String,
    /// Bytes.
    pub size: u64,
}

/// A file as saved.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Saved {
    /// The drive item's id (Graph) or the file's id (Drive).
    pub id: String,
    /// The name it got (`conflict = "rename"` may change it).
    pub name: String,
    pub size: u64,
    /// Where a person opens it (`webUrl`, `webViewLink`).
    pub web_url: String,
    /// An organisation-scoped view link, once made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// A file's bytes, read in order from an offset; reading and decoding run off the runtime.
pub trait FileBytes: Send + Sync {
    /// Chunks of exactly `chunk` bytes (the last one shorter) from `offset` to the end; the
    /// channel closes after the last one or after an error.
    fn chunks(&self, offset: u64, chunk: usize) -> tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>;
}

/// Bytes in memory (tests, a message's text saved as a file).
#[derive(Debug, Clone)]
pub struct MemoryBytes(pub Arc<Vec<u8>>);

impl FileBytes for MemoryBytes {
    fn chunks(&self, offset: u64, chunk: usize) -> tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let bytes = self.0.clone();
        let chunk = chunk.max(1);
        tokio::spawn(async move {
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
            for piece in bytes[start..].chunks(chunk) {
                if tx.send(Ok(piece.to_vec())).await.is_err() {
                    return;
                }
            }
        });
        rx
    }
}

/// Where an upload's resumable state `T` is committed; `save` returns once it is on disk,
/// and the step it protects starts only then.
pub trait StepSink<T>: Send + Sync {
    fn save<'a>(&'a self, step: &'a T) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

/// A sink that keeps nothing (tests; `mfd-relay test`).
pub struct NoSteps;

impl<T: Sync> StepSink<T> for NoSteps {
    fn save<'a>(&'a self, _: &'a T) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async { Ok(()) })
    }
}

/// One file to upload, and what an earlier attempt left of its upload (`T`: the backend's
/// resumable state).
pub struct Upload<'a, T> {
    pub target: &'a Target,
    pub conflict: Conflict,
    pub file: &'a NewFile,
    pub bytes: &'a dyn FileBytes,
    /// What an earlier attempt saved for this file; `None` on its first attempt.
    pub resume: Option<&'a T>,
    pub sink: &'a dyn StepSink<T>,
}

/// A file upload under way, per backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStep {
    Microsoft(microsoft::Step),
    Google(google::Step),
}

/// What a job leaves to resume: the files saved so far (in order) and the one under way.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Resume {
    /// How many files the message makes (another count: another plan, start again).
    pub files: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub saved: Vec<Saved>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<FileStep>,
}
