//! Reception of a message (RFC 5321 4.1.1.4): [`receive`] reads the DATA stream, decodes it,
//! rewrites the header section (`crate::message`), enforces the size limit and writes the
//! body to its sink, and returns one [`DataOutcome`]; the session only turns that into a reply.
//!
//! Decoding ([`DotDecoder`]) finds the end-of-data line, removes dot-stuffing (RFC 5321 4.5.2)
//! and normalises line endings to CRLF. Pure and incremental: bytes go in as they arrive from
//! the socket, decoded bytes come out, nothing is held but a few bytes of state, so a 30 MB
//! scan streams through without being collected in memory.
//!
//! SMTP smuggling: the end of data is `<CRLF>.<CRLF>` and nothing else for a client that uses
//! CRLF. `<LF>.<LF>` (and mixed forms) end the data only for a session that has sent bare LF
//! throughout (old devices), decided by the session before DATA. Every bare LF or bare CR in
//! the content becomes CRLF, and the upstream side dot-stuffs again, so no sequence inside a
//! message can end it early or inject a second message upstream.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::connection::{Connection, ReadError};
use super::ports::BodySink;
use crate::message::{Changes, HeaderScanner, Refusal};

/// RFC 5321 4.5.3.2.5: a server waits at least 3 minutes for each chunk of DATA.
pub const DATA_TIMEOUT: Duration = Duration::from_secs(180);
/// The whole DATA phase may take at most this long (a client trickling bytes is cut off).
pub const DATA_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// How the reception of one message ended. Whatever the outcome, the end-of-data line was
/// read (except for [`DataOutcome::Aborted`]), so the session can go on with the next command.
#[derive(Debug)]
pub enum DataOutcome {
    /// The body is durable in its sink.
    Spooled {
        /// Bytes written (after the header rewrite).
        size: u64,
        /// The body has bytes >= 0x80.
        eight_bit: bool,
        /// The client sent bare LF or CR, turned into CRLF.
        normalised: bool,
    },
    /// More than `limit` decoded bytes; nothing kept.
    TooBig { size: u64 },
    /// The header section cannot be made valid; nothing kept.
    Refused(Refusal),
    /// The sink failed; nothing kept.
    StorageFailed(std::io::Error),
    /// The connection is unusable (closed, timed out mid-DATA); nothing kept.
    Aborted(ReadError),
}

/// What [`receive`] needs besides the connection and the sink.
pub struct Reception<'a> {
    /// `<LF>.<LF>` may end the data (a session that used bare LF throughout).
    pub bare_lf_ends: bool,
    /// The largest message taken, in decoded bytes.
    pub limit: u64,
    /// The header rewrite (Received, From, Message-ID, Date).
    pub changes: &'a Changes<'a>,
}

/// Receives one message after the 354: reads to the end-of-data line, however the message
/// turns out, so that the reply to DATA is the next thing the client reads (RFC 5321 4.1.1.4).
pub async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    mut sink: Box<dyn BodySink>,
    r: Reception<'_>,
) -> DataOutcome {
    let mut decoder = DotDecoder::new(r.bare_lf_ends);
    let mut out = Vec::with_capacity(64 * 1024);
    // The header section, until the scanner finds its end; then the rewritten start went out.
    let mut header: Option<Vec<u8>> = Some(Vec::new());
    let mut scanner = HeaderScanner::new();
    // The first thing that went wrong; the rest of the data is then only read.
    let mut failed: Option<DataOutcome> = None;
    let mut size: u64 = 0;
    let deadline = tokio::time::Instant::now() + DATA_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let chunk = match conn.data_chunk(left.min(DATA_TIMEOUT)).await {
            Ok(c) => c,
            Err(e) => {
                sink.abort();
                return DataOutcome::Aborted(e);
            }
        };
        let progress = decoder.feed(chunk, &mut out);
        let consumed = match progress {
            Progress::Done { consumed } => consumed,
            Progress::NeedMore => chunk.len(),
        };
        conn.consume(consumed);
        size += out.len() as u64;
        if size > r.limit && !matches!(failed, Some(DataOutcome::TooBig { .. })) {
            // Too big outranks a refusal found earlier: it is what the client can fix.
            failed = Some(DataOutcome::TooBig { size });
        }
        if failed.is_none() {
            let res = match header.as_mut() {
                // The scanner looks at each new byte once (no rescan of the buffer).
                Some(h) => {
                    h.extend_from_slice(&out);
                    match scanner
                        .find(h)
                        .and_then(|s| s.map(|s| crate::message::rewrite_start(h, s, r.changes)).transpose())
                    {
                        Ok(Some(first)) => {
                            header = None;
                            sink.write(&first).await
                        }
                        Ok(None) => Ok(()),
                        Err(e) => {
                            failed = Some(DataOutcome::Refused(e));
                            Ok(())
                        }
                    }
                }
                None => sink.write(&out).await,
            };
            if let Err(e) = res {
                failed = Some(DataOutcome::StorageFailed(e));
            }
        }
        out.clear();
        if matches!(progress, Progress::Done { .. }) {
            break;
        }
    }
    // The data ended in the header section: all header, or a last line without CRLF.
    if let (Some(h), None) = (header.take(), failed.as_ref()) {
        match scanner.finish(&h).and_then(|s| crate::message::rewrite_start(&h, s, r.changes)) {
            Ok(first) => {
                if let Err(e) = sink.write(&first).await {
                    failed = Some(DataOutcome::StorageFailed(e));
                }
            }
            Err(e) => failed = Some(DataOutcome::Refused(e)),
        }
    }
    if let Some(f) = failed {
        sink.abort();
        return f;
    }
    let size = sink.written();
    match sink.finish().await {
        Ok(()) => DataOutcome::Spooled { size, eight_bit: decoder.eight_bit, normalised: decoder.normalised },
        Err(e) => DataOutcome::StorageFailed(e),
    }
}

/// Where the decoder is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line; `crlf` says whether the previous line ended with a real CRLF.
    LineStart { crlf: bool },
    /// Saw `.` at the start of a line.
    Dot { crlf: bool },
    /// Saw `.` then CR at the start of a line.
    DotCr { crlf: bool },
    /// Inside a line.
    Middle,
    /// Saw CR inside a line.
    Cr,
}

/// Progress of a [`DotDecoder::feed`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// All input consumed; the end of data has not been seen yet.
    NeedMore,
    /// The end-of-data line ended after `consumed` bytes of this input; the rest belongs to
    /// the next command (RFC 2920 pipelining).
    Done { consumed: usize },
}

/// Incremental DATA decoder.
#[derive(Debug, Clone)]
pub struct DotDecoder {
    state: State,
    bare_lf_ends: bool,
    /// The content has a byte >= 0x80 (needs BODY=8BITMIME upstream, RFC 6152).
    pub eight_bit: bool,
    /// The client sent a bare LF or CR, which was turned into CRLF.
    pub normalised: bool,
}

impl DotDecoder {
    /// `bare_lf_ends`: accept `<LF>.<LF>` as the end of data (only for bare-LF sessions).
    pub fn new(bare_lf_ends: bool) -> Self {
        DotDecoder {
            // The DATA command's own line ending precedes the first line.
            state: State::LineStart { crlf: true },
            bare_lf_ends,
            eight_bit: false,
            normalised: false,
        }
    }

    /// Decodes `input`, appending content to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Progress {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Middle {
                // Fast path: copy the run up to the next CR or LF in one go.
                let run = &input[i..];
                let n = run.iter().position(|&b| b == b'\r' || b == b'\n').unwrap_or(run.len());
                if n > 0 {
                    let chunk = &run[..n];
                    if !self.eight_bit && !chunk.is_ascii() {
                        self.eight_bit = true;
                    }
                    out.extend_from_slice(chunk);
                    i += n;
                    continue;
                }
            }
            let b = input[i];
            i += 1;
            if self.step(b, out) {
                return Progress::Done { consumed: i };
            }
        }
        Progress::NeedMore
    }

    /// One byte outside the fast path; true when it completed the end-of-data line.
    fn step(&mut self, b: u8, out: &mut Vec<u8>) -> bool {
        match self.state {
            State::LineStart { crlf } => {
                if b == b'.' {
                    self.state = State::Dot { crlf };
                } else {
                    self.line_byte(b, out);
                }
            }
            State::Dot { crlf } => match b {
                b'\r' => self.state = State::DotCr { crlf },
                b'\n' if self.bare_lf_ends => return true,
                // "." then bare LF in a CRLF session: not an end; an empty line.
                b'\n' => self.bare_ending(out),
                // Dot-stuffing: a leading dot is removed (RFC 5321 4.5.2).
                _ => self.line_byte(b, out),
            },
            State::DotCr { crlf } => {
                if b == b'\n' {
                    if crlf || self.bare_lf_ends {
                        return true;
                    }
                    // "<LF>.<CRLF>" in a CRLF session is the smuggling pattern: an empty line.
                    out.extend_from_slice(b"\r\n");
                    self.state = State::LineStart { crlf: true };
                } else {
                    // ".<CR>x": the bare CR ends a line of its own.
                    self.after_bare_cr(b, out);
                }
            }
            State::Middle => self.line_byte(b, out),
            State::Cr => {
                if b == b'\n' {
                    out.extend_from_slice(b"\r\n");
                    self.state = State::LineStart { crlf: true };
                } else {
                    self.after_bare_cr(b, out);
                }
            }
        }
        false
    }

    /// A bare LF or CR ended a line: it becomes CRLF, and the next line does not follow a
    /// real CRLF (so it cannot end the data in a CRLF session).
    fn bare_ending(&mut self, out: &mut Vec<u8>) {
        self.normalised = true;
        out.extend_from_slice(b"\r\n");
        self.state = State::LineStart { crlf: false };
    }

    /// `b` followed a bare CR: the CR ended its line, `b` starts the next one.
    fn after_bare_cr(&mut self, b: u8, out: &mut Vec<u8>) {
        self.bare_ending(out);
        self.at_line_start(b, out);
    }

    /// A byte at the start of a line that cannot be the end-of-data line any more.
    fn at_line_start(&mut self, b: u8, out: &mut Vec<u8>) {
        if b == b'.' {
            if let State::LineStart { crlf } = self.state {
                self.state = State::Dot { crlf };
                return;
            }
        }
        self.line_byte(b, out);
    }

    /// A content byte inside a line.
    fn line_byte(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            b'\r' => self.state = State::Cr,
            b'\n' => self.bare_ending(out),
            _ => {
                if b >= 0x80 {
                    self.eight_bit = true;
                }
                out.push(b);
                self.state = State::Middle;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; returns content and leftover.
    fn decode(input: &[u8], bare_lf: bool, step: usize) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut d = DotDecoder::new(bare_lf);
        let mut out = Vec::new();
        for (n, chunk) in input.chunks(step).enumerate() {
            if let Progress::Done { consumed } = d.feed(chunk, &mut out) {
                let rest_start = n * step + consumed;
                return (out, Some(input[rest_start..].to_vec()));
            }
        }
        (out, None)
    }

    fn all_steps(input: &[u8], bare_lf: bool) -> (Vec<u8>, Option<Vec<u8>>) {
        let first = decode(input, bare_lf, input.len().max(1));
        for step in 1..8 {
            assert_eq!(decode(input, bare_lf, step), first, "step {step}");
        }
        first
    }

    #[test]
    fn simple_message_and_pipelined_rest() {
        let (out, rest) = all_steps(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n", false);
        assert_eq!(out, b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(rest.as_deref(), Some(&b"QUIT\r\n"[..]));
    }

    #[test]
    fn empty_message() {
        assert_eq!(all_steps(b".\r\n", false), (vec![], Some(vec![])));
    }

    #[test]
    fn dot_unstuffing() {
        let (out, rest) = all_steps(b"..hidden\r\n.\r\n..\r\nx\r\n.\r\n", false);
        assert_eq!(out, b".hidden\r\n");
        assert_eq!(rest.as_deref(), Some(&b"..\r\nx\r\n.\r\n"[..]));
        let (out, _) = all_steps(b"a\r\n..\r\n...x\r\n.\r\n", false);
        assert_eq!(out, b"a\r\n.\r\n..x\r\n");
    }

    #[test]
    fn bare_lf_is_normalised_but_does_not_end_a_crlf_session() {
        let input = b"a\nb\r\n.\nc\r\n\n.\n\r\n.\r\n";
        let (out, rest) = all_steps(input, false);
        assert_eq!(out, b"a\r\nb\r\n\r\nc\r\n\r\n\r\n\r\n");
        assert_eq!(rest.as_deref(), Some(&b""[..]));
    }

    #[test]
    fn smuggling_sequences_never_end_a_crlf_session() {
        for smuggle in [&b"\n.\r\n"[..], b"\r.\r\n", b"\n.\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r"] {
            let mut input = b"Subject: t\r\n\r\nbody".to_vec();
            input.extend_from_slice(smuggle);
            input.extend_from_slice(b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nevil\r\n.\r\n");
            let (out, rest) = all_steps(&input, false);
            // The whole input is one message; the injected commands are content.
            assert_eq!(rest.as_deref(), Some(&b""[..]), "{smuggle:?}");
            assert!(out.windows(10).any(|w| w == b"MAIL FROM:"), "{smuggle:?}");
            // The content never holds a line that is a lone dot after CRLF.
            assert!(!out.windows(5).any(|w| w == b"\r\n.\r\n"), "{smuggle:?}: {:?}", String::from_utf8_lossy(&out));
            // Every line ending is CRLF.
            for (i, &b) in out.iter().enumerate() {
                if b == b'\n' {
                    assert!(i > 0 && out[i - 1] == b'\r', "{smuggle:?}");
                }
                if b == b'\r' {
                    assert_eq!(out.get(i + 1), Some(&b'\n'), "{smuggle:?}");
                }
            }
        }
    }

    #[test]
    fn bare_lf_session_may_end_with_lf_dot_lf() {
        let (out, rest) = all_steps(b"Subject: x\n\nscan\n.\nQUIT\n", true);
        assert_eq!(out, b"Subject: x\r\n\r\nscan\r\n");
        assert_eq!(rest.as_deref(), Some(&b"QUIT\n"[..]));
        // A CRLF end works for such sessions too.
        let (out, rest) = all_steps(b"scan\r\n.\r\n", true);
        assert_eq!(out, b"scan\r\n");
        assert_eq!(rest.as_deref(), Some(&b""[..]));
    }

    #[test]
    fn eight_bit_is_detected() {
        let mut d = DotDecoder::new(false);
        let mut out = Vec::new();
        d.feed(b"plain\r\n", &mut out);
        assert!(!d.eight_bit);
        d.feed("caf\u{e9}\r\n".as_bytes(), &mut out);
        assert!(d.eight_bit);
        let mut d = DotDecoder::new(false);
        d.feed(b"\xe9", &mut out);
        assert!(d.eight_bit);
    }

    #[test]
    fn binary_noise_is_safe() {
        // A deterministic pseudo-random byte soup: no panic, every line ending CRLF.
        let mut x: u32 = 12345;
        let mut input = Vec::new();
        for _ in 0..20000 {
            x = x.wrapping_mul(1103515245).wrapping_add(12345);
            let b = (x >> 16) as u8;
            input.push(match b % 7 {
                0 => b'\r',
                1 => b'\n',
                2 => b'.',
                _ => b,
            });
        }
        let mut d = DotDecoder::new(false);
        let mut out = Vec::new();
        let _ = d.feed(&input, &mut out);
        for (i, &b) in out.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && out[i - 1] == b'\r');
            }
        }
    }
}
