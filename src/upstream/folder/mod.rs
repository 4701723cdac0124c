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

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::config::Conflict;
use crate::config::{Config, DestinationKind};
use crate::filenames::{Template, Values};
use crate::message::attachments::{self, Attachment, Source};
use crate::oauth::provider::ProviderInfo;
use crate::oauth::tokens::AccessToken;
use crate::upstream::{SendError, SetupError, UpstreamReply};

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

impl FileStep {
    /// The SharePoint/OneDrive upload under way, if that is what it is.
    fn microsoft(&self) -> Option<&microsoft::Step> {
        match self {
            FileStep::Microsoft(s) => Some(s),
            FileStep::Google(_) => None,
        }
    }

    /// The Google Drive upload under way, if that is what it is.
    fn google(&self) -> Option<&google::Step> {
        match self {
            FileStep::Google(s) => Some(s),
            FileStep::Microsoft(_) => None,
        }
    }
}

/// One file's upload for a backend whose resumable state is `T`.
fn upload<'a, T>(
    dest: &'a Destination,
    file: &'a NewFile,
    bytes: &'a dyn FileBytes,
    resume: Option<&'a T>,
    sink: &'a dyn StepSink<T>,
) -> Upload<'a, T> {
    Upload { target: &dest.target, conflict: dest.conflict, file, bytes, resume, sink }
}

/// What a job leaves to resume: the files saved so far (in order) and the one under way.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Resume {
    /// How many files the message makes (another count: another plan, start again).
    pub files: usize,
    /// Where each file goes, as the first attempt named it (folder levels, name): a later
    /// attempt keeps these even if a reload changed the templates, so a file whose upload may
    /// have finished is looked for where it went and never saved again under a new name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<(Vec<String>, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub saved: Vec<Saved>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<FileStep>,
}

/// One `[[destination]]`, resolved.
#[derive(Debug, Clone)]
pub struct Destination {
    pub name: String,
    /// Its recipient address, lower case.
    pub address: String,
    pub identity: String,
    /// The identity's provider (its Graph or Drive endpoint).
    pub provider: String,
    pub kind: DestinationKind,
    pub target: Target,
    pub folder: Template,
    pub file_name: Template,
    pub conflict: Conflict,
    pub receipt: bool,
    pub save_body: bool,
}

/// The backend of a provider.
enum Backend {
    Microsoft(microsoft::GraphDrive),
    Google(google::DriveApi),
}

/// Every destination of a configuration, and the clients that reach them.
#[derive(Default)]
pub struct Folders {
    by_address: HashMap<String, Arc<Destination>>,
    by_name: HashMap<String, Arc<Destination>>,
    backends: HashMap<(String, DestinationKind), Backend>,
}

/// What saving a message's files needs (besides its [`FilePlan`]).
pub struct Job<'a> {
    pub dest: &'a Destination,
    /// What an earlier attempt saved (`Resume::default()` on the first).
    pub resume: &'a Resume,
    pub sink: &'a dyn StepSink<Resume>,
    /// Make an organisation-scoped view link to each file (oversize scans sent as links).
    pub links: bool,
}

/// The reply for a message that has nothing to save (RFC 3463 5.6.0: the content is the
/// problem, not the address).
pub fn nothing_to_save(dest: &str) -> UpstreamReply {
    UpstreamReply::new(
        550,
        format!(
            "5.6.0 nothing to save: the message has no attachment for folder destination \"{dest}\" \
             (scan a page, or set save_body = true to save the text)"
        ),
    )
}

/// The message spooled at a path, read with positioned reads (each chunk of an upload on a
/// blocking thread).
#[derive(Debug, Clone)]
pub struct Spooled {
    file: Arc<std::fs::File>,
    len: u64,
}

impl Spooled {
    pub fn open(path: &Path) -> io::Result<Spooled> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Spooled { file: Arc::new(file), len })
    }
}

impl Source for Spooled {
    fn size(&self) -> u64 {
        self.len
    }

    fn read(&self, start: u64, len: usize) -> io::Result<Vec<u8>> {
        let end = self.len.min(start.saturating_add(len as u64));
        let mut out = vec![0u8; usize::try_from(end.saturating_sub(start)).unwrap_or(0)];
        self.file.read_exact_at(&mut out, start)?;
        Ok(out)
    }
}

/// What a file is made of.
#[derive(Debug, Clone)]
enum Part {
    /// A top-level attachment of the message.
    Attachment(Attachment),
    /// The whole message as a `.eml` (`save_body = true` and no attachment).
    Whole,
}

/// One file a message makes: its name and folder, and where its bytes are.
#[derive(Debug, Clone)]
struct Planned {
    file: NewFile,
    part: Part,
}

/// An attachment's bytes (or the whole message), decoded on a blocking thread.
struct PartBytes {
    src: Spooled,
    part: Part,
}

impl FileBytes for PartBytes {
    fn chunks(&self, offset: u64, chunk: usize) -> tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let (src, part, chunk) = (self.src.clone(), self.part.clone(), chunk.max(1));
        tokio::task::spawn_blocking(move || {
            let mut whole_at = offset;
            let mut content = match &part {
                Part::Attachment(a) => {
                    let mut c = a.content(&src);
                    if let Err(e) = c.skip(offset) {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                    Some(c)
                }
                Part::Whole => None,
            };
            loop {
                let next = match content.as_mut() {
                    Some(c) => c.next_chunk(chunk),
                    None => {
                        let r = src.read(whole_at, chunk);
                        if let Ok(b) = &r {
                            whole_at += b.len() as u64;
                        }
                        r
                    }
                };
                let last = !matches!(&next, Ok(c) if !c.is_empty());
                if matches!(&next, Ok(c) if c.is_empty()) || tx.blocking_send(next).is_err() || last {
                    return;
                }
            }
        });
        rx
    }
}

/// The Subject of a message, for the name of a message saved whole.
fn subject_of(src: &Spooled) -> Option<String> {
    let start = src.read(0, crate::message::MAX_HEADER_SECTION + 4).ok()?;
    let end = start.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4).unwrap_or(start.len());
    let headers = mail_parser::MessageParser::default().parse_headers(&start[..end])?;
    headers.subject().map(str::to_string).filter(|s| !s.trim().is_empty())
}

/// The files a message makes for a destination, named (none: nothing to save).
fn plan(src: &Spooled, dest: &Destination, received: i64, device: &str, id: &str) -> io::Result<Vec<Planned>> {
    let parts = attachments::find(src)?;
    let mut found: Vec<(String, String, u64, Part)> = parts
        .attachments
        .into_iter()
        .map(|a| (a.name.clone(), media_type(&a.content_type), a.size, Part::Attachment(a)))
        .collect();
    if found.is_empty() && dest.save_body {
        let name = format!("{}.eml", subject_of(src).unwrap_or_else(|| "message".into()));
        found.push((name, "message/rfc822".into(), src.size(), Part::Whole));
    }
    let when =
        chrono::DateTime::from_timestamp(received, 0).unwrap_or_default().with_timezone(&chrono::Local).fixed_offset();
    let mut taken = std::collections::HashSet::new();
    Ok(found
        .into_iter()
        .enumerate()
        .map(|(i, (name, content_type, size, part))| {
            let v = Values { when, device, name: &name, destination: &dest.name, id, n: i + 1 };
            let folder = dest.folder.folder_path(&v);
            let name = unique_name(&mut taken, &folder, dest.file_name.file_name(&v));
            Planned { file: NewFile { folder, name, content_type, size }, part }
        })
        .collect())
}

/// The device's `type/subtype` when it is one (RFC 2045 5.1 tokens), else
/// `application/octet-stream`: it goes into HTTP headers (`Content-Type`,
/// `X-Upload-Content-Type`), where anything else would fail every attempt.
fn media_type(declared: &str) -> String {
    let token = |t: &str| {
        !t.is_empty() && t.len() <= 127 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    match declared.split_once('/') {
        Some((t, s)) if token(t) && token(s) => declared.to_ascii_lowercase(),
        _ => "application/octet-stream".into(),
    }
}

/// `name`, or `name (2).ext`, `(3)`, ... when an earlier file of the same message already
/// took it in that folder (two attachments called `scan.pdf`, or a template without
/// `{name}` or `{n}`): one message never saves two files under one name, whatever
/// `conflict` says.
fn unique_name(
    taken: &mut std::collections::HashSet<(Vec<String>, String)>,
    folder: &[String],
    name: String,
) -> String {
    let lower = |n: &str| n.to_lowercase();
    let mut candidate = name.clone();
    let mut n = 1;
    while !taken.insert((folder.to_vec(), lower(&candidate))) {
        n += 1;
        candidate = match name.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => format!("{stem} ({n}).{ext}"),
            _ => format!("{name} ({n})"),
        };
    }
    candidate
}

/// Files one message may make. Each saved file's entry is rewritten into the queue record
/// with every later step, so a hostile device's thousands of tiny parts would cost the store
/// quadratic writes; a real scan is a file or a page per file.
pub const MAX_FILES: usize = 1000;

/// The files a message makes for a destination, as read from the spool (once per attempt).
pub struct FilePlan {
    src: Spooled,
    files: Vec<Planned>,
}

impl FilePlan {
    /// Reads the message spooled at `body` (off the runtime) and names its files for `dest`:
    /// `received` (Unix seconds), `device` and the queue `id` fill the templates.
    pub async fn read(
        dest: &Destination,
        body: &Path,
        received: i64,
        device: &str,
        id: &str,
    ) -> Result<FilePlan, SendError> {
        let (path, device, id, d) = (body.to_path_buf(), device.to_string(), id.to_string(), dest.clone());
        tokio::task::spawn_blocking(move || -> io::Result<FilePlan> {
            let src = Spooled::open(&path)?;
            let files = plan(&src, &d, received, &device, &id)?;
            Ok(FilePlan { src, files })
        })
        .await
        .map_err(spool_error)?
        .map_err(spool_error)
    }

    /// Nothing to save: no attachment, and no `save_body`.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Wraps a backend's step into the job's [`Resume`] and commits that.
struct FileSink<'a, F> {
    outer: &'a dyn StepSink<Resume>,
    base: &'a Resume,
    wrap: F,
}

impl<T, F> StepSink<T> for FileSink<'_, F>
where
    T: Clone + Sync,
    F: Fn(T) -> FileStep + Send + Sync,
{
    fn save<'a>(&'a self, step: &'a T) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        let mut r = self.base.clone();
        r.current = Some((self.wrap)(step.clone()));
        Box::pin(async move { self.outer.save(&r).await })
    }
}

fn spool_error(e: impl std::fmt::Display) -> SendError {
    SendError::Network(format!("reading the spooled message: {e}"))
}

fn progress_error(e: String) -> SendError {
    SendError::Network(format!("cannot record the upload's progress: {e}"))
}

impl Folders {
    /// The destinations of `config` and a client per provider that has some.
    pub fn new(config: &Config, providers: &[Arc<ProviderInfo>]) -> Result<Folders, SetupError> {
        let mut f = Folders { by_address: HashMap::new(), by_name: HashMap::new(), backends: HashMap::new() };
        for d in config.destinations.iter().map(|d| d.get_ref()) {
            let name = d.name.get_ref().clone();
            let setup = |message: String| SetupError { provider: name.clone(), message };
            let identity = d.identity.get_ref().clone();
            let Some(id) = config.identity(&identity) else {
                return Err(setup(format!("destination \"{name}\": identity \"{identity}\" is not defined")));
            };
            let provider = id.provider.get_ref().clone();
            let Some(info) = providers.iter().find(|p| p.name == provider) else {
                return Err(setup(format!("destination \"{name}\": provider \"{provider}\" is not defined")));
            };
            let kind = *d.kind.get_ref();
            let text = |v: &Option<toml::Spanned<String>>| v.as_ref().map(|s| s.get_ref().clone());
            let target = match kind {
                DestinationKind::Sharepoint => {
                    Target::Sharepoint { site: text(&d.site).unwrap_or_default(), library: text(&d.library) }
                }
                DestinationKind::Onedrive => {
                    Target::Onedrive { user: text(&d.user).unwrap_or_else(|| id.email.get_ref().clone()) }
                }
                DestinationKind::GoogleDrive => {
                    Target::GoogleDrive { folder_id: text(&d.folder_id).unwrap_or_else(|| "root".into()) }
                }
            };
            let folder = Template::parse_folder(d.folder.get_ref()).map_err(|e| setup(format!("folder: {e}")))?;
            let file_name = Template::parse(d.file_name.get_ref()).map_err(|e| setup(format!("file_name: {e}")))?;
            let key = (provider.clone(), kind);
            if let std::collections::hash_map::Entry::Vacant(slot) = f.backends.entry(key) {
                let ca = info.ca_file.as_deref();
                let backend = match kind {
                    DestinationKind::Sharepoint | DestinationKind::Onedrive => {
                        let url = info.graph_url.clone().unwrap_or_default();
                        Backend::Microsoft(microsoft::GraphDrive::new(&url, ca).map_err(&setup)?)
                    }
                    DestinationKind::GoogleDrive => {
                        let url = info.drive_api_url.clone().unwrap_or_default();
                        Backend::Google(google::DriveApi::new(&url, ca).map_err(&setup)?)
                    }
                };
                slot.insert(backend);
            }
            let dest = Arc::new(Destination {
                name: name.clone(),
                address: d.address.get_ref().to_ascii_lowercase(),
                identity,
                provider,
                kind,
                target,
                folder,
                file_name,
                conflict: d.conflict,
                receipt: d.receipt,
                save_body: d.save_body,
            });
            f.by_address.insert(dest.address.clone(), dest.clone());
            f.by_name.insert(name, dest);
        }
        Ok(f)
    }

    /// No destination is configured.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The destination a recipient address stands for.
    pub fn by_address(&self, address: &str) -> Option<&Arc<Destination>> {
        if self.by_address.is_empty() {
            return None;
        }
        self.by_address.get(&address.to_ascii_lowercase())
    }

    /// Every destination's address.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.by_address.keys().map(String::as_str)
    }

    /// A destination by its name.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Destination>> {
        self.by_name.get(name)
    }

    /// Whether the message spooled at `body` has something to save for `dest` (an attachment,
    /// or its text with `save_body`). Reads the spool: call it off the runtime.
    pub fn has_files(dest: &Destination, body: &Path) -> io::Result<bool> {
        if dest.save_body {
            return Ok(true);
        }
        Ok(!attachments::find(&Spooled::open(body)?)?.attachments.is_empty())
    }

    /// Saves the files of `plan` to the job's destination, continuing what `job.resume` says
    /// was done; returns them as saved, in order.
    pub async fn save(&self, token: &AccessToken, job: &Job<'_>, plan: &FilePlan) -> Result<Vec<Saved>, SendError> {
        let dest = job.dest;
        let backend = self.backends.get(&(dest.provider.clone(), dest.kind)).ok_or_else(|| {
            SendError::Rejected(UpstreamReply::new(
                451,
                format!("4.3.5 destination \"{}\" has no client for its provider", dest.name),
            ))
        })?;
        if plan.is_empty() {
            return Err(SendError::Rejected(nothing_to_save(&dest.name)));
        }
        if plan.files.len() > MAX_FILES {
            return Err(SendError::Rejected(UpstreamReply::new(
                554,
                format!(
                    "5.6.0 the message has {} attachments; a folder destination takes at most {MAX_FILES} per message",
                    plan.files.len()
                ),
            )));
        }
        let (src, files) = (&plan.src, plan.files.clone());
        let mut files = files;
        let mut r = if job.resume.files == files.len() && job.resume.saved.len() <= files.len() {
            job.resume.clone()
        } else {
            Resume { files: files.len(), ..Resume::default() }
        };
        if r.names.len() == files.len() {
            // Where the first attempt put them.
            for (f, (folder, name)) in files.iter_mut().zip(&r.names) {
                f.file.folder = folder.clone();
                f.file.name = name.clone();
            }
        } else {
            r.names = files.iter().map(|f| (f.file.folder.clone(), f.file.name.clone())).collect();
            job.sink.save(&r).await.map_err(progress_error)?;
        }
        for planned in files.iter().skip(r.saved.len()) {
            let bytes = PartBytes { src: src.clone(), part: planned.part.clone() };
            let current = r.current.take();
            let saved = match backend {
                Backend::Microsoft(b) => {
                    let resume = current.as_ref().and_then(FileStep::microsoft);
                    let sink = FileSink { outer: job.sink, base: &r, wrap: FileStep::Microsoft };
                    b.save(token, &upload(dest, &planned.file, &bytes, resume, &sink)).await?
                }
                Backend::Google(b) => {
                    let resume = current.as_ref().and_then(FileStep::google);
                    let sink = FileSink { outer: job.sink, base: &r, wrap: FileStep::Google };
                    b.save(token, &upload(dest, &planned.file, &bytes, resume, &sink)).await?
                }
            };
            r.saved.push(saved);
            job.sink.save(&r).await.map_err(progress_error)?;
        }
        if job.links {
            for i in 0..r.saved.len() {
                if r.saved[i].link.is_some() {
                    continue;
                }
                let link = match backend {
                    Backend::Microsoft(b) => b.share(token, &dest.target, &r.saved[i]).await?,
                    Backend::Google(b) => b.share(token, &dest.target, &r.saved[i]).await?,
                };
                r.saved[i].link = Some(link);
                job.sink.save(&r).await.map_err(progress_error)?;
            }
        }
        Ok(r.saved)
    }
}

/// Where a saved file's bytes were: for a destination's path in logs.
pub fn describe(dest: &Destination, saved: &[Saved]) -> String {
    let names: Vec<&str> = saved.iter().map(|s| s.name.as_str()).collect();
    format!("saved {} file(s) to {} \"{}\": {}", saved.len(), dest.kind, dest.name, names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_s_media_type_reaches_http_headers_only_when_it_is_one() {
        assert_eq!(media_type("Application/PDF"), "application/pdf");
        assert_eq!(media_type("image/svg+xml"), "image/svg+xml");
        for bad in ["application/pdf\r\nX-Evil: 1", "text", "a/b/c", "application/pdf; x=y", "bild/jpé", "/", ""] {
            assert_eq!(media_type(bad), "application/octet-stream", "{bad:?}");
        }
    }

    #[test]
    fn two_files_of_one_message_never_share_a_name() {
        let mut taken = std::collections::HashSet::new();
        let f = vec!["Scans".to_string()];
        assert_eq!(unique_name(&mut taken, &f, "scan.pdf".into()), "scan.pdf");
        assert_eq!(unique_name(&mut taken, &f, "Scan.PDF".into()), "Scan (2).PDF");
        assert_eq!(unique_name(&mut taken, &f, "scan.pdf".into()), "scan (3).pdf");
        assert_eq!(unique_name(&mut taken, &[], "scan.pdf".into()), "scan.pdf", "another folder");
        assert_eq!(unique_name(&mut taken, &f, "README".into()), "README");
        assert_eq!(unique_name(&mut taken, &f, "README".into()), "README (2)");
    }
}
