//! A spooled message as an HTTP mail API must receive it: its header naming exactly the
//! envelope's recipients ([`crate::message::recipients`]), its body untouched and read from
//! the spool as it goes out, never copied whole unless a caller asks for it.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::message::recipients::{for_envelope, header_len, Plan};
use crate::message::MAX_HEADER_SECTION;

/// The message to send: a (possibly rewritten) header section, then the spooled file from
/// the end of its own header section on.
#[derive(Debug, Clone)]
pub struct Outgoing {
    path: PathBuf,
    /// The header section to send, with its empty line.
    head: Vec<u8>,
    /// Where the spooled file's empty line after its header section ends.
    rest_at: u64,
    len: u64,
    /// Who the API will send to.
    pub plan: Plan,
}

impl Outgoing {
    /// Reads the header section of the message spooled at `path` and plans its recipients.
    pub fn open(path: &Path, envelope: &[String]) -> io::Result<Outgoing> {
        let mut f = File::open(path)?;
        let file_len = f.metadata()?.len();
        let mut start = Vec::with_capacity(8192);
        (&mut f).take((MAX_HEADER_SECTION + 4) as u64).read_to_end(&mut start)?;
        let (header, rest_at) = match header_len(&start) {
            Some(n) => (&start[..n], n as u64 + 2),
            // No body at all: the whole (small) message is its header.
            None if start.len() as u64 == file_len => (&start[..], file_len),
            None => return Err(io::Error::new(io::ErrorKind::InvalidData, "the spooled message has no end of header")),
        };
        let (plan, new) = for_envelope(header, envelope);
        let mut head = new.unwrap_or_else(|| header.to_vec());
        head.extend_from_slice(b"\r\n");
        let len = head.len() as u64 + (file_len - rest_at.min(file_len));
        Ok(Outgoing { path: path.to_path_buf(), head, rest_at, len, plan })
    }

    /// The size of the message as sent.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole message in memory (for requests that carry it in one body).
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        self.read_range(0, usize::try_from(self.len).unwrap_or(usize::MAX))
    }

    /// Up to `len` bytes from `start` (fewer at the end).
    pub fn read_range(&self, start: u64, len: usize) -> io::Result<Vec<u8>> {
        let end = self.len.min(start.saturating_add(len as u64));
        let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
        let head_len = self.head.len() as u64;
        if start < head_len {
            out.extend_from_slice(&self.head[start as usize..end.min(head_len) as usize]);
        }
        if end > head_len {
            let from = start.max(head_len) - head_len + self.rest_at;
            let mut f = File::open(&self.path)?;
            f.seek(SeekFrom::Start(from))?;
            let want = end - start.max(head_len);
            f.take(want).read_to_end(&mut out)?;
            if (out.len() as u64) < end - start {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the spooled message is shorter than it was"));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spooled(text: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.eml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn ranges_join_the_new_header_and_the_spooled_body() {
        let (_d, path) = spooled(b"To: a@x.test, b@x.test\r\nSubject: s\r\n\r\nline 1\r\nline 2\r\n");
        let out = Outgoing::open(&path, &["b@x.test".to_string()]).expect("opens");
        let whole = b"To: b@x.test\r\nSubject: s\r\n\r\nline 1\r\nline 2\r\n";
        assert_eq!(out.read_all().expect("reads"), whole);
        assert_eq!(out.len(), whole.len() as u64);
        let mut joined = Vec::new();
        for start in (0..out.len()).step_by(5) {
            joined.extend(out.read_range(start, 5).expect("range"));
        }
        assert_eq!(joined, whole);
        assert_eq!(out.read_range(10, 1000).expect("tail"), &whole[10..]);
    }

    #[test]
    fn a_message_that_names_its_envelope_goes_out_as_spooled() {
        let text = b"To: a@x.test\r\n\r\nbody\r\n";
        let (_d, path) = spooled(text);
        let out = Outgoing::open(&path, &["a@x.test".to_string()]).expect("opens");
        assert_eq!(out.read_all().expect("reads"), text);
    }

    #[test]
    fn a_truncated_spool_file_is_an_error_not_a_short_message() {
        let (_d, path) = spooled(b"To: a@x.test\r\n\r\n0123456789");
        let out = Outgoing::open(&path, &["a@x.test".to_string()]).expect("opens");
        std::fs::write(&path, b"To: a@x.test\r\n\r\n01").expect("truncate");
        assert!(out.read_range(0, 100).is_err());
    }
}
