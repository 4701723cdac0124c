//! Print jobs on disk: one folder per mail, written so that a consumer never sees half a job.
//!
//! Layout, for a mailbox `print` with `spool = "/var/spool/mfd"`:
//!
//! ```text
//! /var/spool/mfd/print/20261126T063712.123456Z-uid42/   a finished job (names sort by arrival)
//!     job.json                                          sender, subject, files, hand-off results
//!     report.pdf                                        the attachments, with safe names
//! /var/spool/mfd/.tmp/print/<job>/                      a job being written
//! ```
//!
//! A job is written into the temporary folder, every file and the folder are fsynced, then
//! the folder is renamed into place (rename(2) is atomic within a file system) and the parent
//! is fsynced, so the rename itself survives a crash. `job.json` is replaced the same way
//! (write, fsync, rename) when the print command's results are added.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::filename::JOB_JSON;
use super::policy::PlannedFile;

/// Format version of job.json.
pub const JOB_VERSION: u32 = 1;
/// The temporary area, a sibling of the mailboxes' job folders under `spool`.
pub const TMP_DIR: &str = ".tmp";

/// Errors writing a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("job.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("writing the job was interrupted: {0}")]
    Join(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JobError + '_ {
    move |source| JobError::Io { path: path.to_path_buf(), source }
}

/// One file of a job, as described in job.json.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFile {
    pub name: String,
    /// The sender's name for it, when it had to be changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_name: Option<String>,
    pub content_type: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// The result of the print command for one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffResult {
    pub file: String,
    pub command: Vec<String>,
    /// RFC 3339.
    pub started: String,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub timed_out: bool,
    /// Could not run at all, or was killed by a signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stdout: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr: String,
}

impl HandoffResult {
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && self.error.is_none()
    }
}

/// job.json.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobJson {
    pub version: u32,
    pub mailbox: String,
    pub folder: String,
    pub uidvalidity: u32,
    pub uid: u32,
    /// When the relay wrote the job (RFC 3339, UTC).
    pub spooled: String,
    pub sender: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The mail's Date field (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub files: Vec<JobFile>,
    /// The mail's text, for mails without attachments when `print_body` is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Parts left out on purpose (embedded pictures).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// The print command's results, once it has run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<Vec<HandoffResult>>,
}

/// A job folder's name: the spool time (UTC, microseconds, fixed width, so names sort by
/// arrival) and the UID, e.g. `20261126T063712.123456Z-uid42`.
pub fn job_name(at: chrono::DateTime<chrono::Utc>, uid: u32) -> String {
    format!("{}-uid{uid}", at.format("%Y%m%dT%H%M%S%.6fZ"))
}

/// Size and SHA-256 of each planned file, for job.json.
pub fn describe(files: &[PlannedFile]) -> Vec<JobFile> {
    files
        .iter()
        .map(|f| JobFile {
            name: f.name.clone(),
            original_name: f.original_name.clone(),
            content_type: f.content_type.clone(),
            size: f.data.len() as u64,
            sha256: super::state::hex(&Sha256::digest(&f.data)),
        })
        .collect()
}

/// Where one mailbox's jobs live.
#[derive(Debug, Clone)]
pub struct JobDirs {
    /// `spool/<mailbox>`: finished jobs only.
    pub jobs: PathBuf,
    /// `spool/.tmp/<mailbox>`: jobs being written.
    pub tmp: PathBuf,
}

impl JobDirs {
    /// `mailbox_dir` is the mailbox's name made safe as a folder name.
    pub fn new(spool: &Path, mailbox_dir: &str) -> JobDirs {
        JobDirs { jobs: spool.join(mailbox_dir), tmp: spool.join(TMP_DIR).join(mailbox_dir) }
    }

    /// Creates both folders and removes what a crash left in the temporary one.
    pub fn prepare(&self) -> Result<(), JobError> {
        create_private_dir(&self.jobs)?;
        create_private_dir(&self.tmp)?;
        for entry in std::fs::read_dir(&self.tmp).map_err(io(&self.tmp))? {
            let path = entry.map_err(io(&self.tmp))?.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
        Ok(())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.jobs.join(name)
    }

    /// Whether the finished job `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        self.path(name).join(JOB_JSON).is_file()
    }

    /// Writes a job atomically (see the module docs) on the blocking pool; returns its folder.
    pub async fn write(&self, name: &str, json: &JobJson, files: Vec<PlannedFile>) -> Result<PathBuf, JobError> {
        let text = serde_json::to_vec_pretty(json)?;
        let dirs = self.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || dirs.write_blocking(&name, &text, &files))
            .await
            .map_err(|e| JobError::Join(e.to_string()))?
    }

    fn write_blocking(&self, name: &str, json: &[u8], files: &[PlannedFile]) -> Result<PathBuf, JobError> {
        let tmp = self.tmp.join(name);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        create_private_dir(&tmp)?;
        for f in files {
            write_synced(&tmp.join(&f.name), &f.data)?;
        }
        write_synced(&tmp.join(JOB_JSON), json)?;
        sync_dir(&tmp)?;
        let dest = self.path(name);
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        sync_dir(&self.jobs)?;
        Ok(dest)
    }

    /// Replaces job.json of a finished job atomically.
    pub async fn update_json(&self, name: &str, json: &JobJson) -> Result<(), JobError> {
        let text = serde_json::to_vec_pretty(json)?;
        let dir = self.path(name);
        tokio::task::spawn_blocking(move || {
            let tmp = dir.join(format!(".{JOB_JSON}.tmp"));
            write_synced(&tmp, &text)?;
            let dest = dir.join(JOB_JSON);
            std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
            sync_dir(&dir)
        })
        .await
        .map_err(|e| JobError::Join(e.to_string()))?
    }

    /// Reads job.json of a finished job.
    pub fn read_json(&self, name: &str) -> Result<JobJson, JobError> {
        let path = self.path(name).join(JOB_JSON);
        let text = std::fs::read(&path).map_err(io(&path))?;
        Ok(serde_json::from_slice(&text)?)
    }
}

/// Mode of job folders: mail content is for the relay's user (and the print command it
/// runs) only, whatever the umask.
pub const DIR_MODE: u32 = crate::fsutil::DIR_MODE;
/// Mode of job files.
pub const FILE_MODE: u32 = crate::fsutil::FILE_MODE;

/// Creates `path` (and missing parents) private to the relay ([`crate::fsutil`]).
fn create_private_dir(path: &Path) -> Result<(), JobError> {
    crate::fsutil::create_private_dir(path).map_err(io(path))
}

/// Writes a new file ([`FILE_MODE`]) and fsyncs it.
fn write_synced(path: &Path, data: &[u8]) -> Result<(), JobError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, FILE_MODE);
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(io(path))
}

/// fsyncs a directory, so that the names in it (a rename) are durable.
fn sync_dir(path: &Path) -> Result<(), JobError> {
    crate::fsutil::sync_dir(path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn json(uid: u32) -> JobJson {
        JobJson {
            version: JOB_VERSION,
            mailbox: "print".into(),
            folder: "INBOX".into(),
            uidvalidity: 7,
            uid,
            spooled: "2026-11-26T06:37:12Z".into(),
            sender: "alice@contoso.com".into(),
            sender_name: Some("Alice".into()),
            subject: Some("two files".into()),
            date: None,
            message_id: Some("<1@x>".into()),
            files: vec![],
            body: None,
            skipped: vec![],
            handoff: None,
        }
    }

    fn file(name: &str, data: &[u8]) -> PlannedFile {
        PlannedFile {
            name: name.into(),
            original_name: None,
            content_type: "application/pdf".into(),
            data: data.into(),
            part: None,
        }
    }

    #[test]
    fn names_sort_by_arrival() {
        let t = |s: i64, us: u32| chrono::Utc.timestamp_opt(s, us * 1000).unwrap();
        let a = job_name(t(1_795_000_000, 5), 900);
        let b = job_name(t(1_795_000_000, 6), 12);
        let c = job_name(t(1_795_000_001, 0), 3);
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(job_name(t(0, 0), 1), "19700101T000000.000000Z-uid1");
    }

    #[test]
    fn describe_hashes_and_sizes() {
        let d = describe(&[file("a.pdf", b"abc")]);
        assert_eq!(d[0].size, 3);
        assert_eq!(d[0].sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[tokio::test]
    async fn a_job_appears_complete_or_not_at_all() {
        let spool = tempfile::tempdir().unwrap();
        let dirs = JobDirs::new(spool.path(), "print");
        dirs.prepare().unwrap();
        // A crash left a half-written job in the temporary folder: prepare() removes it.
        std::fs::create_dir_all(dirs.tmp.join("half")).unwrap();
        std::fs::write(dirs.tmp.join("half").join("a.pdf"), b"x").unwrap();
        dirs.prepare().unwrap();
        assert_eq!(std::fs::read_dir(&dirs.tmp).unwrap().count(), 0);

        let mut j = json(42);
        let files = vec![file("a.pdf", b"%PDF-1"), file("b.pdf", b"%PDF-2")];
        j.files = describe(&files);
        assert!(!dirs.exists("job1"));
        let path = dirs.write("job1", &j, files).await.unwrap();
        assert_eq!(path, spool.path().join("print").join("job1"));
        assert!(dirs.exists("job1"));
        assert_eq!(std::fs::read(path.join("b.pdf")).unwrap(), b"%PDF-2");
        assert_eq!(dirs.read_json("job1").unwrap(), j);
        assert_eq!(std::fs::read_dir(&dirs.tmp).unwrap().count(), 0, "nothing left behind");
        // Only finished jobs in the mailbox folder.
        let names: Vec<_> =
            std::fs::read_dir(&dirs.jobs).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, ["job1"]);

        j.handoff = Some(vec![]);
        dirs.update_json("job1", &j).await.unwrap();
        assert_eq!(dirs.read_json("job1").unwrap().handoff, Some(vec![]));
        let mut listing: Vec<_> =
            std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        listing.sort();
        assert_eq!(listing, ["a.pdf", "b.pdf", "job.json"]);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn job_folders_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let spool = tempfile::tempdir().unwrap();
        let dirs = JobDirs::new(&spool.path().join("deep"), "print");
        dirs.prepare().unwrap();
        assert_eq!(mode(&dirs.jobs), DIR_MODE);
        assert_eq!(mode(&dirs.tmp), DIR_MODE);
        // An existing, wider folder is narrowed.
        std::fs::set_permissions(&dirs.jobs, std::fs::Permissions::from_mode(0o777)).unwrap();
        dirs.prepare().unwrap();
        assert_eq!(mode(&dirs.jobs), DIR_MODE);
        let path = dirs.write("job1", &json(1), vec![file("a.pdf", b"%PDF-1")]).await.unwrap();
        assert_eq!(mode(&path), DIR_MODE);
        assert_eq!(mode(&path.join("a.pdf")), FILE_MODE);
        assert_eq!(mode(&path.join(JOB_JSON)), FILE_MODE);
        dirs.update_json("job1", &json(1)).await.unwrap();
        assert_eq!(mode(&path.join(JOB_JSON)), FILE_MODE, "a replaced job.json too");
    }

    #[tokio::test]
    async fn a_leftover_temporary_job_is_replaced() {
        let spool = tempfile::tempdir().unwrap();
        let dirs = JobDirs::new(spool.path(), "print");
        dirs.prepare().unwrap();
        std::fs::create_dir_all(dirs.tmp.join("job2")).unwrap();
        std::fs::write(dirs.tmp.join("job2").join("a.pdf"), b"old").unwrap();
        dirs.write("job2", &json(2), vec![file("a.pdf", b"new")]).await.unwrap();
        assert_eq!(std::fs::read(dirs.path("job2").join("a.pdf")).unwrap(), b"new");
    }
}
