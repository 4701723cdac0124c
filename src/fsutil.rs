//! File-system helpers shared by everything that writes under `data_dir` (the queue's spool,
//! the database, print jobs): private folders and files, and directory fsync.
//!
//! Scans and tokens are confidential: folders are 0700 and files 0600 whatever the umask the
//! relay was started with (mkdir(2) and open(2) only narrow a mode by the umask, so the mode is
//! also set explicitly on folders that already existed).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Mode of every folder the relay creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the relay creates.
pub const FILE_MODE: u32 = 0o600;

/// Creates a folder (and its parents) readable by the relay's user only; an existing folder
/// is made private too.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
}

/// fsync of a directory: makes the names in it (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
