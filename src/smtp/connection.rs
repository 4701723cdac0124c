//! Framing for one device connection: buffered reads of command lines and DATA chunks, and
//! buffered replies.
//!
//! Replies are collected and written only when the relay is about to wait for more input,
//! which is exactly what RFC 2920 (PIPELINING) allows: a client that sends a group of
//! commands gets the group's replies in one write, and a client that waits gets each reply at
//! once.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::reply::Reply;

/// Read size during DATA: large enough for a TCP window at a time.
const DATA_CHUNK: usize = 64 * 1024;
/// Read size for commands: small, because a thousand idle printers each hold one buffer.
const COMMAND_CHUNK: usize = 4 * 1024;

/// A line read from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The line without its ending; `bare_lf` when it ended with LF alone.
    Text { line: Vec<u8>, bare_lf: bool },
    /// Longer than the limit; the rest of it was read and thrown away.
    TooLong,
}

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("client closed the connection")]
    Closed,
    #[error("client timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A buffered device connection.
pub struct Connection<S> {
    stream: S,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S) -> Self {
        Connection { stream, rbuf: Vec::with_capacity(COMMAND_CHUNK), rpos: 0, wbuf: Vec::with_capacity(512) }
    }

    /// Gives the stream back (for STARTTLS). Buffered input is dropped: RFC 3207 4.2 says
    /// anything the client sent after STARTTLS, before TLS, must be discarded.
    pub fn into_inner(self) -> (S, usize) {
        let leftover = self.rbuf.len() - self.rpos;
        (self.stream, leftover)
    }

    /// Whether input is already buffered (pipelined commands).
    pub fn has_buffered_input(&self) -> bool {
        self.rpos < self.rbuf.len()
    }

    /// Queues a reply.
    pub fn send(&mut self, reply: &Reply) {
        reply.write_to(&mut self.wbuf);
    }

    /// Writes queued replies.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Reads up to `chunk` more bytes into the buffer, flushing replies first.
    async fn fill(&mut self, timeout: Duration, chunk: usize) -> Result<(), ReadError> {
        self.flush().await?;
        if self.rpos > 0 && self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        } else if self.rpos > chunk {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        if self.rbuf.is_empty() && self.rbuf.capacity() > 2 * chunk {
            // Back to commands after DATA: give the large buffer back.
            self.rbuf = Vec::with_capacity(chunk);
        }
        let start = self.rbuf.len();
        self.rbuf.resize(start + chunk, 0);
        let n = match tokio::time::timeout(timeout, self.stream.read(&mut self.rbuf[start..])).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                self.rbuf.truncate(start);
                return Err(e.into());
            }
            Err(_) => {
                self.rbuf.truncate(start);
                return Err(ReadError::Timeout);
            }
        };
        self.rbuf.truncate(start + n);
        if n == 0 {
            return Err(ReadError::Closed);
        }
        Ok(())
    }

    /// Reads one line of at most `max` bytes (without its ending). The whole line must
    /// arrive within `timeout`, so a client sending one byte at a time (slowloris) is cut
    /// off like a silent one.
    pub async fn read_line(&mut self, max: usize, timeout: Duration) -> Result<Line, ReadError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut too_long = false;
        loop {
            let pending = &self.rbuf[self.rpos..];
            if let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let raw = &pending[..i];
                let bare_lf = !raw.ends_with(b"\r");
                let line = if bare_lf { raw } else { &raw[..raw.len() - 1] };
                let result = if too_long || line.len() > max {
                    Line::TooLong
                } else {
                    Line::Text { line: line.to_vec(), bare_lf }
                };
                self.rpos += i + 1;
                return Ok(result);
            }
            if pending.len() > max {
                // Throw away what we have of the overlong line and keep reading to its end.
                too_long = true;
                self.rpos = self.rbuf.len();
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(ReadError::Timeout);
            }
            self.fill(left, COMMAND_CHUNK).await?;
        }
    }

    /// Buffered input for DATA, reading more when none is buffered. The caller consumes
    /// what it used with [`Connection::consume`].
    pub async fn data_chunk(&mut self, timeout: Duration) -> Result<&[u8], ReadError> {
        if !self.has_buffered_input() {
            self.fill(timeout, DATA_CHUNK).await?;
        }
        Ok(&self.rbuf[self.rpos..])
    }

    pub fn consume(&mut self, n: usize) {
        self.rpos = (self.rpos + n).min(self.rbuf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_long_lines_and_pipelining() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut conn = Connection::new(server);
        let mut client = client;
        let long = "X".repeat(5000);
        client.write_all(format!("EHLO a\r\nMAIL FROM:<b>\n{long}\r\nQUIT\r\n").as_bytes()).await.unwrap();
        let t = Duration::from_secs(1);
        assert_eq!(conn.read_line(1000, t).await.unwrap(), Line::Text { line: b"EHLO a".to_vec(), bare_lf: false });
        assert!(conn.has_buffered_input());
        assert_eq!(
            conn.read_line(1000, t).await.unwrap(),
            Line::Text { line: b"MAIL FROM:<b>".to_vec(), bare_lf: true }
        );
        assert_eq!(conn.read_line(1000, t).await.unwrap(), Line::TooLong);
        assert_eq!(conn.read_line(1000, t).await.unwrap(), Line::Text { line: b"QUIT".to_vec(), bare_lf: false });
        conn.send(&crate::smtp::reply::ok());
        assert!(matches!(conn.read_line(1000, Duration::from_millis(50)).await, Err(ReadError::Timeout)));
        // The reply was flushed before waiting.
        let mut buf = [0u8; 64];
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"250 2.0.0 OK\r\n");
        drop(client);
        assert!(matches!(conn.read_line(1000, t).await, Err(ReadError::Closed)));
    }

    #[tokio::test]
    async fn endless_line_is_bounded() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut conn = Connection::new(server);
        let writer = tokio::spawn(async move {
            let chunk = vec![b'A'; 64 * 1024];
            for _ in 0..32 {
                client.write_all(&chunk).await.unwrap();
            }
            client.write_all(b"\r\nNOOP\r\n").await.unwrap();
            client
        });
        let t = Duration::from_secs(5);
        assert_eq!(conn.read_line(1000, t).await.unwrap(), Line::TooLong);
        assert!(conn.rbuf.capacity() < 64 * 1024, "the 2 MB line was not kept");
        assert_eq!(conn.read_line(1000, t).await.unwrap(), Line::Text { line: b"NOOP".to_vec(), bare_lf: false });
        drop(writer.await.unwrap());
    }
}
