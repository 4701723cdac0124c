//! Splitting a MIME message into "the message without its attachments" and those attachments,
//! for an API whose requests are smaller than a scan (Microsoft Graph takes at most about
//! 3 MB per request: ARCHITECTURE.md, "Graph and the Gmail API").
//!
//! Only the top-level multipart is looked at (RFC 2046 5.1): a scanner sends
//! `multipart/mixed` with a text part and one file per scan. A part is an attachment when it has
//! a file name or `Content-Disposition: attachment` and is neither a multipart nor a message.
//! Removing a part removes its delimiter line and its bytes; every other byte of the message
//! stays as it was. Should every part be an attachment, an empty `text/plain` part takes the
//! first one's place (a multipart needs at least one part, RFC 2046 5.1.1). A message that is
//! not multipart but one file (a named `application/pdf` body) is that file plus an empty
//! text message with the same header fields but those that described the file.
//!
//! The message is read through a [`Source`] (memory, or the spool file as it goes out) a
//! bounded block at a time, and an attachment's content is decoded the same way ([`Content`]):
//! a 150 MB scan is never in memory as a whole, encoded or decoded.

use std::io;
use std::ops::Range;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use mail_parser::{MessageParser, MimeHeaders};

use super::MAX_HEADER_SECTION;

/// Bytes read from a [`Source`] at once while scanning (unit tests: a few, so that lines and
/// base64 quantums are cut at every place).
const BLOCK: usize = if cfg!(test) { 13 } else { 1 << 20 };

/// Where a message's bytes come from.
pub trait Source {
    /// Its length.
    fn size(&self) -> u64;
    /// `len` bytes from `start`, fewer only at the end.
    fn read(&self, start: u64, len: usize) -> io::Result<Vec<u8>>;
}

impl Source for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read(&self, start: u64, len: usize) -> io::Result<Vec<u8>> {
        let start = usize::try_from(start).unwrap_or(usize::MAX).min(self.len());
        Ok(self[start..start.saturating_add(len).min(self.len())].to_vec())
    }
}

/// The Content-Transfer-Encoding of an attachment (RFC 2045 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Base64,
    QuotedPrintable,
    /// 7bit, 8bit or binary: the body bytes are the content.
    Identity,
}

/// One attachment of the top-level multipart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Its file name (RFC 2231 / RFC 2047 decoded), or `attachment-N`.
    pub name: String,
    /// `type/subtype`, `application/octet-stream` when absent.
    pub content_type: String,
    /// `Content-ID` without angle brackets.
    pub content_id: Option<String>,
    /// `Content-Disposition: inline`.
    pub inline: bool,
    /// Decoded size in bytes.
    pub size: u64,
    pub encoding: Encoding,
    /// The encoded body of the part within the message.
    body: Range<u64>,
    /// What removing the part removes: its delimiter line (with the CRLF before it) and the part.
    cut: Range<u64>,
}

/// The message as found: its top-level attachments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    pub attachments: Vec<Attachment>,
    /// The multipart's boundary (when there are attachments).
    boundary: String,
    /// The multipart has parts that are no attachments.
    has_other: bool,
    /// The message is not multipart but one file: its header section's length (CRLF CRLF
    /// included).
    single: Option<u64>,
}

/// Finds the top-level attachments of `msg` (none when it is not multipart).
pub fn find<S: Source + ?Sized>(msg: &S) -> io::Result<Parts> {
    let none = Parts { attachments: Vec::new(), boundary: String::new(), has_other: true, single: None };
    let start = msg.read(0, MAX_HEADER_SECTION + 4)?;
    let body_start = match find_bytes(&start, b"\r\n\r\n") {
        Some(i) => i + 4,
        None => return Ok(none),
    };
    let Some(headers) = MessageParser::default().parse_headers(&start[..body_start]) else { return Ok(none) };
    let Some(ct) = headers.content_type() else { return Ok(none) };
    if !ct.ctype().eq_ignore_ascii_case("multipart") {
        // The whole message may be one file (a device that sends the scan as the body).
        let whole = 0..msg.size();
        let probe = attachment(msg, whole.clone(), whole, 0)?;
        return Ok(match probe {
            Some(a) => Parts {
                attachments: vec![a],
                boundary: String::new(),
                has_other: false,
                single: Some(body_start as u64),
            },
            None => none,
        });
    }
    let Some(boundary) = ct.attribute("boundary").filter(|b| !b.is_empty()).map(str::to_string) else {
        return Ok(none);
    };
    let delimiters = delimiters(msg, body_start as u64, boundary.as_bytes())?;
    let mut attachments = Vec::new();
    let mut has_other = false;
    for pair in delimiters.windows(2) {
        let (d, next) = (&pair[0], &pair[1]);
        if d.close {
            break;
        }
        let part = d.content_start..next.cut_start.max(d.content_start);
        match attachment(msg, part, d.cut_start..next.cut_start, attachments.len())? {
            Some(a) => attachments.push(a),
            None => has_other = true,
        }
    }
    // An unterminated multipart: the last part runs to the end; leave it in the message.
    if delimiters.last().is_some_and(|d| !d.close) {
        has_other = true;
    }
    Ok(Parts { attachments, boundary, has_other, single: None })
}

/// A delimiter line (RFC 2046 5.1.1) of the top-level multipart.
struct Delimiter {
    /// Where removing the part after it starts: the CRLF before the line (the line itself
    /// when it opens the body).
    cut_start: u64,
    /// After the line's CRLF.
    content_start: u64,
    /// `--boundary--`.
    close: bool,
}

/// Whether `line` (without its CRLF) is a delimiter line; `Some(true)` for the close one.
fn delimiter(line: &[u8], boundary: &[u8]) -> Option<bool> {
    let rest = line.strip_prefix(b"--")?.strip_prefix(boundary)?;
    let close = rest.starts_with(b"--");
    let tail = if close { &rest[2..] } else { rest };
    // Transport padding after the boundary is allowed (RFC 2046 5.1.1).
    tail.iter().all(|&b| b == b' ' || b == b'\t').then_some(close)
}

/// The delimiter lines after `body_start`, read a block at a time. Only a line's first bytes
/// are kept: a delimiter line is short (a boundary is at most 70 characters).
fn delimiters<S: Source + ?Sized>(msg: &S, body_start: u64, boundary: &[u8]) -> io::Result<Vec<Delimiter>> {
    let keep = boundary.len() + 4 + 256;
    let mut out = Vec::new();
    let mut line_start = body_start;
    let mut line: Vec<u8> = Vec::with_capacity(keep);
    let mut pos = body_start;
    let total = msg.size();
    let check = |line: &[u8], line_start: u64, next: u64, out: &mut Vec<Delimiter>| -> bool {
        let content = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() >= keep {
            return false;
        }
        match delimiter(content, boundary) {
            Some(close) => {
                let cut_start = if line_start > body_start { line_start - 2 } else { line_start };
                out.push(Delimiter { cut_start, content_start: next.min(total), close });
                close
            }
            None => false,
        }
    };
    while pos < total {
        let block = msg.read(pos, BLOCK)?;
        if block.is_empty() {
            break;
        }
        let mut i = 0;
        while i < block.len() {
            match block[i..].iter().position(|&b| b == b'\n') {
                Some(n) => {
                    let take = n.min(keep.saturating_sub(line.len()));
                    line.extend_from_slice(&block[i..i + take]);
                    let next = pos + (i + n) as u64 + 1;
                    // Only CRLF ends a line (the spool holds CRLF lines).
                    if line.last() == Some(&b'\r') || n > take {
                        if check(&line, line_start, next, &mut out) {
                            return Ok(out);
                        }
                        line.clear();
                        line_start = next;
                    } else {
                        line.push(b'\n');
                    }
                    i += n + 1;
                }
                None => {
                    let take = (block.len() - i).min(keep.saturating_sub(line.len()));
                    line.extend_from_slice(&block[i..i + take]);
                    i = block.len();
                }
            }
        }
        pos += block.len() as u64;
    }
    // A last line without CRLF.
    if !line.is_empty() {
        check(&line, line_start, total, &mut out);
    }
    Ok(out)
}

/// The part at `part` when it is an attachment.
fn attachment<S: Source + ?Sized>(
    msg: &S,
    part: Range<u64>,
    cut: Range<u64>,
    n: usize,
) -> io::Result<Option<Attachment>> {
    let len = usize::try_from(part.end - part.start).unwrap_or(usize::MAX);
    let bytes = msg.read(part.start, len.min(MAX_HEADER_SECTION + 4))?;
    // A part that starts with CRLF has no header fields (RFC 2046 5.1.1).
    let header_end = if bytes.starts_with(b"\r\n") {
        2
    } else {
        match find_bytes(&bytes, b"\r\n\r\n") {
            Some(i) => i + 4,
            None => return Ok(None),
        }
    };
    let Some(headers) = MessageParser::default().parse_headers(&bytes[..header_end]) else { return Ok(None) };
    let ct = headers.content_type();
    let ctype = ct.map_or("text", |c| c.ctype());
    if ctype.eq_ignore_ascii_case("multipart") || ctype.eq_ignore_ascii_case("message") {
        return Ok(None);
    }
    let disposition = headers.content_disposition();
    let is_attachment = disposition.is_some_and(|d| d.ctype().eq_ignore_ascii_case("attachment"));
    let name = headers.attachment_name().map(str::to_string);
    if !is_attachment && name.is_none() {
        return Ok(None);
    }
    let content_type = match ct {
        Some(c) => format!("{}/{}", c.ctype(), c.subtype().unwrap_or("octet-stream")).to_ascii_lowercase(),
        None => "application/octet-stream".to_string(),
    };
    let encoding = match headers.content_transfer_encoding().map(|e| e.trim().to_ascii_lowercase()) {
        Some(e) if e == "base64" => Encoding::Base64,
        Some(e) if e == "quoted-printable" => Encoding::QuotedPrintable,
        _ => Encoding::Identity,
    };
    let body = part.start + header_end as u64..part.end;
    let mut a = Attachment {
        name: name.unwrap_or_else(|| format!("attachment-{}", n + 1)),
        content_type,
        content_id: headers.content_id().map(|c| c.trim_matches(['<', '>', ' ']).to_string()),
        inline: disposition.is_some_and(|d| d.ctype().eq_ignore_ascii_case("inline")),
        size: 0,
        encoding,
        body,
        cut,
    };
    a.size = match encoding {
        Encoding::Base64 => base64_size(msg, a.body.clone())?,
        Encoding::QuotedPrintable => quoted_printable(&read_range(msg, a.body.clone())?).len() as u64,
        Encoding::Identity => a.body.end - a.body.start,
    };
    Ok(Some(a))
}

fn read_range<S: Source + ?Sized>(msg: &S, r: Range<u64>) -> io::Result<Vec<u8>> {
    msg.read(r.start, usize::try_from(r.end - r.start).unwrap_or(usize::MAX))
}

/// `msg` without `remove` (a subset of [`find`]'s attachments, in order). Every byte outside the
/// removed parts is kept; when nothing but attachments would be left, an empty text part is put
/// in the first one's place.
pub fn without<S: Source + ?Sized>(msg: &S, parts: &Parts, remove: &[&Attachment]) -> io::Result<Vec<u8>> {
    if let (Some(body_start), false) = (parts.single, remove.is_empty()) {
        return Ok(single_without(&msg.read(0, usize::try_from(body_start).unwrap_or(0).saturating_sub(2))?));
    }
    let mut out = Vec::new();
    let mut at = 0;
    let all = !parts.has_other && remove.len() == parts.attachments.len();
    for (i, a) in remove.iter().enumerate() {
        out.extend_from_slice(&read_range(msg, at..a.cut.start)?);
        if all && i == 0 {
            if a.cut.start > 0 && msg.read(a.cut.start, 2)? == b"\r\n" {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(
                format!("--{}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n", parts.boundary).as_bytes(),
            );
            // The next delimiter brings its own CRLF: the empty part ends right here.
            if msg.read(a.cut.end, 2)? != b"\r\n" {
                out.extend_from_slice(b"\r\n");
            }
        }
        at = a.cut.end;
    }
    out.extend_from_slice(&read_range(msg, at..msg.size())?);
    Ok(out)
}

/// A message that is one file, without it: its header section less the fields that described
/// the file, as an empty text message (RFC 2045 5.2: text/plain is the default).
fn single_without(header: &[u8]) -> Vec<u8> {
    const FILE_FIELDS: [&str; 5] =
        ["Content-Type", "Content-Transfer-Encoding", "Content-Disposition", "Content-ID", "Content-Description"];
    let mut out = Vec::with_capacity(header.len() + 64);
    for f in super::fields(header) {
        if FILE_FIELDS.iter().any(|n| f.is(n)) {
            continue;
        }
        out.extend_from_slice(f.name);
        out.push(b':');
        out.extend_from_slice(f.value);
        out.extend_from_slice(b"\r\n");
        for m in &f.more {
            out.extend_from_slice(m);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"Content-Type: text/plain; charset=us-ascii\r\n\r\n");
    out
}

impl Attachment {
    /// Its content, decoded a chunk at a time.
    pub fn content<'a, S: Source + ?Sized>(&self, msg: &'a S) -> Content<'a, S> {
        let state = match self.encoding {
            Encoding::Base64 => State::Base64 { chars: Vec::new(), ended: false },
            Encoding::QuotedPrintable => State::Decoded(None),
            Encoding::Identity => State::Identity,
        };
        Content { msg, body: self.body.clone(), pos: self.body.start, state, carry: Vec::new() }
    }

    /// Its whole content (an attachment small enough for one request).
    pub fn read_all<S: Source + ?Sized>(&self, msg: &S) -> io::Result<Vec<u8>> {
        self.content(msg).next_chunk(usize::try_from(self.size).unwrap_or(usize::MAX))
    }
}

/// An attachment's decoded content, read in chunks.
pub struct Content<'a, S: Source + ?Sized> {
    msg: &'a S,
    body: Range<u64>,
    /// The next encoded byte to read.
    pos: u64,
    state: State,
    /// Decoded bytes not handed out yet.
    carry: Vec<u8>,
}

enum State {
    /// `chars`: base64 characters read but not decoded yet (less than a quantum).
    Base64 {
        chars: Vec<u8>,
        ended: bool,
    },
    Identity,
    /// Quoted-printable is decoded whole (rare for a scan, and never large).
    Decoded(Option<(Vec<u8>, usize)>),
}

/// Decodes base64 as RFC 2045 6.8 says: characters outside the alphabet are ignored, `=` ends
/// a segment (the data goes on after it when an encoder padded each line).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

fn is_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

impl<S: Source + ?Sized> Content<'_, S> {
    /// The next at most `max` bytes; empty at the end.
    pub fn next_chunk(&mut self, max: usize) -> io::Result<Vec<u8>> {
        match &mut self.state {
            State::Identity => {
                let n = usize::try_from(self.body.end - self.pos).unwrap_or(usize::MAX).min(max);
                let out = self.msg.read(self.pos, n)?;
                self.pos += out.len() as u64;
                Ok(out)
            }
            State::Decoded(data) => {
                if data.is_none() {
                    *data = Some((quoted_printable(&read_range(self.msg, self.body.clone())?), 0));
                }
                let Some((data, at)) = data else { return Ok(Vec::new()) };
                let end = at.saturating_add(max).min(data.len());
                let out = data[*at..end].to_vec();
                *at = end;
                Ok(out)
            }
            State::Base64 { chars, ended } => {
                while self.carry.len() < max && !*ended {
                    // Enough encoded bytes for what is missing, plus room for line breaks.
                    let want = ((max - self.carry.len()) / 3 + 1).saturating_mul(4).min(BLOCK * 4);
                    let n = usize::try_from(self.body.end - self.pos).unwrap_or(usize::MAX).min(want + want / 32 + 16);
                    let block = self.msg.read(self.pos, n)?;
                    self.pos += block.len() as u64;
                    for &b in &block {
                        if b == b'=' {
                            // Padding ends a segment, not necessarily the data: some encoders
                            // pad each line. The segment decodes whole; what follows goes on.
                            let whole = chars.len() - usize::from(chars.len() % 4 == 1);
                            let decoded = LENIENT
                                .decode(&chars[..whole])
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                            self.carry.extend_from_slice(&decoded);
                            chars.clear();
                            continue;
                        }
                        if is_b64(b) {
                            chars.push(b);
                        }
                    }
                    if block.is_empty() || self.pos >= self.body.end {
                        *ended = true;
                    }
                    // Whole quantums now; at the end, the rest too (a lone last character
                    // carries no whole byte).
                    let whole =
                        if *ended { chars.len() - usize::from(chars.len() % 4 == 1) } else { chars.len() / 4 * 4 };
                    let decoded =
                        LENIENT.decode(&chars[..whole]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    self.carry.extend_from_slice(&decoded);
                    chars.drain(..whole);
                    if *ended {
                        chars.clear();
                    }
                }
                let n = max.min(self.carry.len());
                let rest = self.carry.split_off(n);
                Ok(std::mem::replace(&mut self.carry, rest))
            }
        }
    }

    /// Skips `n` bytes (resuming an upload).
    pub fn skip(&mut self, mut n: u64) -> io::Result<()> {
        const STEP: usize = 3 << 20;
        while n > 0 {
            let step = usize::try_from(n).unwrap_or(STEP).min(STEP);
            let got = self.next_chunk(step)?.len();
            if got == 0 {
                return Ok(());
            }
            n -= got as u64;
        }
        Ok(())
    }
}

/// The decoded size of base64 text (RFC 2045 6.8), counted a block at a time without decoding.
fn base64_size<S: Source + ?Sized>(msg: &S, body: Range<u64>) -> io::Result<u64> {
    let segment = |chars: u64| chars / 4 * 3 + [0, 0, 1, 2][(chars % 4) as usize];
    let (mut chars, mut size) = (0u64, 0u64);
    let mut pos = body.start;
    while pos < body.end {
        let n = usize::try_from(body.end - pos).unwrap_or(usize::MAX).min(BLOCK);
        let block = msg.read(pos, n)?;
        if block.is_empty() {
            break;
        }
        for &b in &block {
            if b == b'=' {
                // The end of a segment: counted as `next_chunk` decodes it.
                size += segment(chars);
                chars = 0;
                continue;
            }
            chars += u64::from(is_b64(b));
        }
        pos += block.len() as u64;
    }
    Ok(size + segment(chars))
}

/// Decodes quoted-printable (RFC 2045 6.7): `=XX`, soft line breaks `=` CRLF; an `=` that
/// starts neither is kept as it is.
fn quoted_printable(src: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(src.len());
    let mut i = 0;
    while i < src.len() {
        let b = src[i];
        if b == b'=' {
            // A soft line break; at the very end, its CRLF is the delimiter's.
            if src[i + 1..].starts_with(b"\r\n") || i + 1 == src.len() {
                i += 3;
                continue;
            }
            if let (Some(h), Some(l)) = (src.get(i + 1).and_then(|&c| hex(c)), src.get(i + 2).and_then(|&c| hex(c))) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        // Trailing whitespace on a line was added in transport (RFC 2045 6.7 rule 3).
        if (b == b' ' || b == b'\t') && {
            let rest = &src[i..];
            let ws = rest.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
            rest[ws..].starts_with(b"\r\n") || ws == rest.len()
        } {
            i += 1;
            continue;
        }
        out.push(b);
        i += 1;
    }
    out
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    fn wrapped(bytes: &[u8]) -> String {
        let b = STANDARD.encode(bytes);
        b.as_bytes().chunks(76).map(|c| format!("{}\r\n", String::from_utf8_lossy(c))).collect()
    }

    fn scan(pdf: &[u8], png: &[u8]) -> Vec<u8> {
        format!(
            "From: scans@contoso.com\r\nTo: a@b.c\r\nSubject: Scan\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"=_b1\"\r\n\r\n\
             This is a multi-part message in MIME format.\r\n\
             --=_b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlease find the scan attached.\r\n\
             --=_b1\r\nContent-Type: application/pdf; name=\"scan 1.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\
             Content-Disposition: attachment; filename=\"scan 1.pdf\"\r\n\r\n{}\
             --=_b1 \r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\
             Content-Disposition: inline; filename=\"p.png\"\r\nContent-ID: <p1@x>\r\n\r\n{}\
             --=_b1--\r\nepilogue\r\n",
            wrapped(pdf),
            wrapped(png)
        )
        .into_bytes()
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
    }

    #[test]
    fn finds_the_attachments_and_removing_them_keeps_every_other_byte() {
        let (pdf, png) = (bytes(10_000, 1), bytes(301, 2));
        let msg = scan(&pdf, &png);
        let parts = find(msg.as_slice()).expect("reads");
        let [a, b] = parts.attachments.as_slice() else { panic!("{parts:?}") };
        assert_eq!(
            (a.name.as_str(), a.content_type.as_str(), a.size, a.inline),
            ("scan 1.pdf", "application/pdf", 10_000, false)
        );
        assert_eq!((b.name.as_str(), b.content_id.as_deref(), b.size, b.inline), ("p.png", Some("p1@x"), 301, true));
        assert_eq!(a.read_all(&msg[..]).expect("reads"), pdf);
        assert_eq!(b.read_all(&msg[..]).expect("reads"), png);

        let rest = without(&msg[..], &parts, &[a, b]).expect("reads");
        let expected = b"From: scans@contoso.com\r\nTo: a@b.c\r\nSubject: Scan\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"=_b1\"\r\n\r\n\
             This is a multi-part message in MIME format.\r\n\
             --=_b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlease find the scan attached.\r\n\
             --=_b1--\r\nepilogue\r\n";
        assert_eq!(String::from_utf8_lossy(&rest), String::from_utf8_lossy(expected));
        // Removing only the first keeps the second part byte for byte.
        let rest = without(&msg[..], &parts, &[a]).expect("reads");
        let rest = String::from_utf8_lossy(&rest);
        assert!(rest.contains(&format!("Content-ID: <p1@x>\r\n\r\n{}--=_b1--\r\n", wrapped(&png))), "{rest}");
        assert!(!rest.contains("scan 1.pdf"));
        let reparsed = MessageParser::default().parse(rest.as_bytes()).expect("parses");
        assert_eq!(reparsed.attachments().count(), 1);
        assert_eq!(reparsed.body_text(0).as_deref(), Some("Please find the scan attached."));
    }

    #[test]
    fn a_message_of_attachments_only_keeps_an_empty_text_part() {
        let pdf = bytes(5000, 3);
        let msg = format!(
            "Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: application/pdf\r\n\
             Content-Disposition: attachment; filename=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n{}--b--\r\n",
            wrapped(&pdf)
        );
        let parts = find(msg.as_bytes()).expect("reads");
        assert_eq!(parts.attachments.len(), 1);
        let all: Vec<&Attachment> = parts.attachments.iter().collect();
        let rest = without(msg.as_bytes(), &parts, &all).expect("reads");
        assert_eq!(
            String::from_utf8_lossy(&rest),
            "Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\r\n--b--\r\n"
        );
        let reparsed = MessageParser::default().parse(&rest).expect("parses");
        assert_eq!(reparsed.attachments().count(), 0);
        assert_eq!(reparsed.parts.len(), 2);
    }

    #[test]
    fn not_multipart_or_no_file_means_no_attachment() {
        assert!(find(&b"Subject: x\r\n\r\nbody\r\n"[..]).expect("reads").attachments.is_empty());
        assert!(find(&b"Subject: x\r\nContent-Type: application/pdf\r\n\r\n%PDF\r\n"[..])
            .expect("reads")
            .attachments
            .is_empty());
        let msg = b"Content-Type: multipart/alternative; boundary=q\r\n\r\n--q\r\nContent-Type: text/plain\r\n\r\nhi\r\n--q\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n--q--\r\n";
        assert!(find(&msg[..]).expect("reads").attachments.is_empty());
        // A boundary inside a longer word is no delimiter.
        let msg = b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\nContent-Disposition: attachment; filename=a\r\n\r\n--qx\r\n--q--\r\n";
        let parts = find(&msg[..]).expect("reads");
        assert_eq!(parts.attachments.len(), 1);
        assert_eq!(parts.attachments[0].read_all(&msg[..]).expect("reads"), b"--qx");
    }

    #[test]
    fn content_comes_in_chunks_and_can_skip() {
        let pdf = bytes(100_003, 9);
        let msg = scan(&pdf, b"x");
        let parts = find(msg.as_slice()).expect("reads");
        let a = &parts.attachments[0];
        let mut c = a.content(&msg[..]);
        let mut got = Vec::new();
        loop {
            let chunk = c.next_chunk(7_001).expect("reads");
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 7_001);
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, pdf);
        let mut c = a.content(&msg[..]);
        c.skip(50_001).expect("reads");
        assert_eq!(c.next_chunk(10).expect("reads"), pdf[50_001..50_011]);
    }

    #[test]
    fn quoted_printable_and_identity_parts_decode() {
        let msg = b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\nContent-Type: text/csv; name=t.csv\r\n\
            Content-Transfer-Encoding: quoted-printable\r\n\r\na=3Db  \r\nlong=\r\nline=\r\n--q\r\n\
            Content-Type: application/octet-stream; name=raw.bin\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\x01\xff\r\n--q--\r\n";
        let parts = find(&msg[..]).expect("reads");
        let [t, r] = parts.attachments.as_slice() else { panic!("{parts:?}") };
        assert_eq!(t.read_all(&msg[..]).expect("reads"), b"a=b\r\nlongline");
        assert_eq!(t.size, 13);
        assert_eq!(r.read_all(&msg[..]).expect("reads"), b"\x00\x01\xff");
        assert_eq!(r.content_type, "application/octet-stream");
    }

    #[test]
    fn base64_padded_on_each_line_decodes_whole() {
        // An encoder that encodes each line's bytes on their own: 56 bytes a line, padded.
        let data = bytes(10_000, 3);
        let mut body = String::new();
        for line in data.chunks(56) {
            body.push_str(&STANDARD.encode(line));
            body.push_str("\r\n");
        }
        assert!(body.matches('=').count() > 100, "padded per line");
        let msg = format!(
            "Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\nContent-Type: text/plain\r\n\r\nx\r\n--q\r\n\
             Content-Type: application/pdf; name=p.pdf\r\nContent-Transfer-Encoding: base64\r\n\
             Content-Disposition: attachment; filename=p.pdf\r\n\r\n{body}--q--\r\n"
        );
        let parts = find(msg.as_bytes()).expect("reads");
        let a = &parts.attachments[0];
        assert_eq!(a.size, data.len() as u64, "counted past the padding");
        assert_eq!(a.read_all(msg.as_bytes()).expect("reads"), data);
        let mut c = a.content(msg.as_bytes());
        let mut got = Vec::new();
        loop {
            let chunk = c.next_chunk(999).expect("reads");
            if chunk.is_empty() {
                break;
            }
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, data, "in chunks too");
    }

    #[test]
    fn base64_size_counts_without_decoding() {
        for n in 0..20 {
            let data = bytes(n, 0);
            let w = wrapped(&data);
            assert_eq!(base64_size(w.as_bytes(), 0..w.len() as u64).expect("reads"), n as u64);
        }
    }

    #[test]
    fn a_message_that_is_one_file_becomes_an_empty_text_and_the_file() {
        let pdf = bytes(4000, 6);
        let msg = format!(
            "From: scans@contoso.com\r\nTo: a@b.c,\r\n d@e.f\r\nSubject: Scan\r\nMIME-Version: 1.0\r\n\
             Content-Type: application/pdf; name=scan.pdf\r\nContent-Transfer-Encoding: base64\r\n\
             Content-Disposition: attachment;\r\n filename=scan.pdf\r\n\r\n{}",
            wrapped(&pdf)
        );
        let parts = find(msg.as_bytes()).expect("reads");
        let [a] = parts.attachments.as_slice() else { panic!("{parts:?}") };
        assert_eq!((a.name.as_str(), a.size), ("scan.pdf", 4000));
        assert_eq!(a.read_all(msg.as_bytes()).expect("reads"), pdf);
        let rest = without(msg.as_bytes(), &parts, &[a]).expect("reads");
        assert_eq!(
            String::from_utf8_lossy(&rest),
            "From: scans@contoso.com\r\nTo: a@b.c,\r\n d@e.f\r\nSubject: Scan\r\nMIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        );
        // Nothing removed: the message as it is.
        assert_eq!(without(msg.as_bytes(), &parts, &[]).expect("reads"), msg.as_bytes());
        // A plain text message is no file.
        assert!(find(&b"Subject: x\r\nContent-Type: text/plain\r\n\r\nhello\r\n"[..])
            .expect("reads")
            .attachments
            .is_empty());
    }
}
