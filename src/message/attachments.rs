//! Splitting a MIME message into "the message without its attachments" and those attachments,
//! for an API whose requests are smaller than a scan (Microsoft Graph takes at most about
//! 3 MB per request: ARCHITECTURE.md, "Graph and the Gmail API").
//!
//! Only the top-level multipart is looked at (RFC 2046 5.1): a scanner sends
//! `multipart/mixed` with a text part and one file per scan. A part is an attachment when it has
//! a file name or `Content-Disposition: attachment` and is neither a multipart nor a message.
//! Removing a part removes its delimiter line and its bytes; every other byte of the message
//! stays as it was. Should every part be an attachment, an empty `text/plain` part takes the
//! first one's place (a multipart needs at least one part, RFC 2046 5.1.1).
//!
//! An attachment's content is decoded lazily, a bounded chunk at a time ([`Content`]): a
//! 150 MB scan is never decoded into memory as a whole.

use std::ops::Range;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use mail_parser::{MessageParser, MimeHeaders};

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
    body: Range<usize>,
    /// What removing the part removes: its delimiter line (with the CRLF before it) and the part.
    cut: Range<usize>,
}

/// The message as found: its top-level attachments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    pub attachments: Vec<Attachment>,
    /// The multipart's boundary (when there are attachments).
    boundary: String,
    /// The multipart has parts that are no attachments.
    has_other: bool,
}

/// Finds the top-level attachments of `msg` (none when it is not multipart).
pub fn find(msg: &[u8]) -> Parts {
    let none = Parts { attachments: Vec::new(), boundary: String::new(), has_other: true };
    let body_start = match find_bytes(msg, b"\r\n\r\n") {
        Some(i) => i + 4,
        None => return none,
    };
    let Some(headers) = MessageParser::default().parse_headers(&msg[..body_start]) else { return none };
    let Some(ct) = headers.content_type() else { return none };
    if !ct.ctype().eq_ignore_ascii_case("multipart") {
        return none;
    }
    let Some(boundary) = ct.attribute("boundary").filter(|b| !b.is_empty()).map(str::to_string) else {
        return none;
    };
    let delimiters = delimiters(msg, body_start, boundary.as_bytes());
    let mut attachments = Vec::new();
    let mut has_other = false;
    for pair in delimiters.windows(2) {
        let (d, next) = (&pair[0], &pair[1]);
        if d.close {
            break;
        }
        let part = d.content_start..next.cut_start.max(d.content_start);
        match attachment(msg, part, d.cut_start..next.cut_start, attachments.len()) {
            Some(a) => attachments.push(a),
            None => has_other = true,
        }
    }
    // An unterminated multipart: the last part runs to the end; leave it in the message.
    if delimiters.last().is_some_and(|d| !d.close) {
        has_other = true;
    }
    Parts { attachments, boundary, has_other }
}

/// A delimiter line (RFC 2046 5.1.1) of the top-level multipart.
struct Delimiter {
    /// Where removing the part after it starts: the CRLF before the line (the line itself
    /// when it opens the body).
    cut_start: usize,
    /// After the line's CRLF.
    content_start: usize,
    /// `--boundary--`.
    close: bool,
}

fn delimiters(msg: &[u8], body_start: usize, boundary: &[u8]) -> Vec<Delimiter> {
    let mut out = Vec::new();
    let mut line = body_start;
    while line < msg.len() {
        let end = find_bytes(&msg[line..], b"\r\n").map_or(msg.len(), |i| line + i);
        let l = &msg[line..end];
        if l.len() >= boundary.len() + 2 && l.starts_with(b"--") && &l[2..2 + boundary.len()] == boundary {
            let tail = &l[2 + boundary.len()..];
            let close = tail.starts_with(b"--");
            let tail = if close { &tail[2..] } else { tail };
            // Transport padding after the boundary is allowed (RFC 2046 5.1.1).
            if tail.iter().all(|&b| b == b' ' || b == b'\t') {
                let cut_start = if line > body_start { line - 2 } else { line };
                out.push(Delimiter { cut_start, content_start: (end + 2).min(msg.len()), close });
                if close {
                    break;
                }
            }
        }
        line = end + 2;
    }
    out
}

/// The part at `part` when it is an attachment.
fn attachment(msg: &[u8], part: Range<usize>, cut: Range<usize>, n: usize) -> Option<Attachment> {
    let bytes = &msg[part.clone()];
    // A part that starts with CRLF has no header fields (RFC 2046 5.1.1).
    let header_end = if bytes.starts_with(b"\r\n") { 2 } else { find_bytes(bytes, b"\r\n\r\n")? + 4 };
    let headers = MessageParser::default().parse_headers(&bytes[..header_end])?;
    let ct = headers.content_type();
    let ctype = ct.map_or("text", |c| c.ctype());
    if ctype.eq_ignore_ascii_case("multipart") || ctype.eq_ignore_ascii_case("message") {
        return None;
    }
    let disposition = headers.content_disposition();
    let is_attachment = disposition.is_some_and(|d| d.ctype().eq_ignore_ascii_case("attachment"));
    let name = headers.attachment_name().map(str::to_string);
    if !is_attachment && name.is_none() {
        return None;
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
    let body = part.start + header_end..part.end;
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
        Encoding::Base64 => base64_size(&msg[a.body.clone()]),
        Encoding::QuotedPrintable => quoted_printable(&msg[a.body.clone()]).len() as u64,
        Encoding::Identity => a.body.len() as u64,
    };
    Some(a)
}

/// `msg` without `remove` (a subset of [`find`]'s attachments, in order). Every byte outside the
/// removed parts is kept; when nothing but attachments would be left, an empty text part is put
/// in the first one's place.
pub fn without(msg: &[u8], parts: &Parts, remove: &[&Attachment]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len().min(8 << 20));
    let mut at = 0;
    let all = !parts.has_other && remove.len() == parts.attachments.len();
    for (i, a) in remove.iter().enumerate() {
        out.extend_from_slice(&msg[at..a.cut.start]);
        if all && i == 0 {
            if a.cut.start > 0 && msg[a.cut.start..].starts_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(
                format!("--{}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n", parts.boundary).as_bytes(),
            );
            // The next delimiter brings its own CRLF: the empty part ends right here.
            if !msg[a.cut.end..].starts_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
        at = a.cut.end;
    }
    out.extend_from_slice(&msg[at..]);
    out
}

impl Attachment {
    /// Its content, decoded a chunk at a time.
    pub fn content<'a>(&self, msg: &'a [u8]) -> Content<'a> {
        let src = &msg[self.body.clone()];
        let source = match self.encoding {
            Encoding::Base64 => Source::Base64 { src, pos: 0 },
            Encoding::QuotedPrintable => Source::Owned { data: quoted_printable(src), pos: 0 },
            Encoding::Identity => Source::Borrowed { data: src, pos: 0 },
        };
        Content { source, carry: Vec::new() }
    }

    /// Its whole content (an attachment small enough for one request).
    pub fn read_all(&self, msg: &[u8]) -> Vec<u8> {
        self.content(msg).next_chunk(usize::try_from(self.size).unwrap_or(usize::MAX))
    }
}

/// An attachment's decoded content, read in chunks.
pub struct Content<'a> {
    source: Source<'a>,
    /// Decoded bytes not handed out yet.
    carry: Vec<u8>,
}

enum Source<'a> {
    Base64 { src: &'a [u8], pos: usize },
    Borrowed { data: &'a [u8], pos: usize },
    Owned { data: Vec<u8>, pos: usize },
}

/// Decodes base64 as RFC 2045 6.8 says: characters outside the alphabet are ignored, `=` ends it.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

fn is_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

impl Content<'_> {
    /// The next at most `max` bytes; empty at the end.
    pub fn next_chunk(&mut self, max: usize) -> Vec<u8> {
        match &mut self.source {
            Source::Borrowed { data, pos } => take(data, pos, max),
            Source::Owned { data, pos } => take(data, pos, max),
            Source::Base64 { src, pos } => {
                while self.carry.len() < max && *pos < src.len() {
                    let want = ((max - self.carry.len()) / 3 + 1).saturating_mul(4).min(16 << 20);
                    let mut chars = Vec::with_capacity(want);
                    while chars.len() < want && *pos < src.len() {
                        let b = src[*pos];
                        if b == b'=' {
                            *pos = src.len();
                            break;
                        }
                        if is_b64(b) {
                            chars.push(b);
                        }
                        *pos += 1;
                    }
                    // A lone last character carries no whole byte.
                    if chars.len() % 4 == 1 {
                        chars.pop();
                    }
                    match LENIENT.decode(&chars) {
                        Ok(bytes) => self.carry.extend_from_slice(&bytes),
                        Err(_) => break,
                    }
                }
                let n = max.min(self.carry.len());
                let rest = self.carry.split_off(n);
                std::mem::replace(&mut self.carry, rest)
            }
        }
    }

    /// Skips `n` bytes (resuming an upload).
    pub fn skip(&mut self, mut n: u64) {
        const STEP: usize = 3 << 20;
        while n > 0 {
            let step = usize::try_from(n).unwrap_or(STEP).min(STEP);
            let got = self.next_chunk(step).len();
            if got == 0 {
                return;
            }
            n -= got as u64;
        }
    }
}

fn take(data: &[u8], pos: &mut usize, max: usize) -> Vec<u8> {
    let end = pos.saturating_add(max).min(data.len());
    let out = data[*pos..end].to_vec();
    *pos = end;
    out
}

/// The decoded size of base64 text (RFC 2045 6.8), counted without decoding.
fn base64_size(src: &[u8]) -> u64 {
    let end = src.iter().position(|&b| b == b'=').unwrap_or(src.len());
    let chars = src[..end].iter().filter(|&&b| is_b64(b)).count() as u64;
    chars / 4 * 3 + [0, 0, 1, 2][(chars % 4) as usize]
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
        let parts = find(&msg);
        let [a, b] = parts.attachments.as_slice() else { panic!("{parts:?}") };
        assert_eq!(
            (a.name.as_str(), a.content_type.as_str(), a.size, a.inline),
            ("scan 1.pdf", "application/pdf", 10_000, false)
        );
        assert_eq!((b.name.as_str(), b.content_id.as_deref(), b.size, b.inline), ("p.png", Some("p1@x"), 301, true));
        assert_eq!(a.read_all(&msg), pdf);
        assert_eq!(b.read_all(&msg), png);

        let rest = without(&msg, &parts, &[a, b]);
        let expected = b"From: scans@contoso.com\r\nTo: a@b.c\r\nSubject: Scan\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"=_b1\"\r\n\r\n\
             This is a multi-part message in MIME format.\r\n\
             --=_b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlease find the scan attached.\r\n\
             --=_b1--\r\nepilogue\r\n";
        assert_eq!(String::from_utf8_lossy(&rest), String::from_utf8_lossy(expected));
        // Removing only the first keeps the second part byte for byte.
        let rest = without(&msg, &parts, &[a]);
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
        let parts = find(msg.as_bytes());
        assert_eq!(parts.attachments.len(), 1);
        let all: Vec<&Attachment> = parts.attachments.iter().collect();
        let rest = without(msg.as_bytes(), &parts, &all);
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
        assert!(find(b"Subject: x\r\n\r\nbody\r\n").attachments.is_empty());
        assert!(find(b"Subject: x\r\nContent-Type: application/pdf\r\n\r\n%PDF\r\n").attachments.is_empty());
        let msg = b"Content-Type: multipart/alternative; boundary=q\r\n\r\n--q\r\nContent-Type: text/plain\r\n\r\nhi\r\n--q\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n--q--\r\n";
        assert!(find(msg).attachments.is_empty());
        // A boundary inside a longer word is no delimiter.
        let msg = b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\nContent-Disposition: attachment; filename=a\r\n\r\n--qx\r\n--q--\r\n";
        let parts = find(msg);
        assert_eq!(parts.attachments.len(), 1);
        assert_eq!(parts.attachments[0].read_all(msg), b"--qx");
    }

    #[test]
    fn content_comes_in_chunks_and_can_skip() {
        let pdf = bytes(100_003, 9);
        let msg = scan(&pdf, b"x");
        let parts = find(&msg);
        let a = &parts.attachments[0];
        let mut c = a.content(&msg);
        let mut got = Vec::new();
        loop {
            let chunk = c.next_chunk(7_001);
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 7_001);
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, pdf);
        let mut c = a.content(&msg);
        c.skip(50_001);
        assert_eq!(c.next_chunk(10), pdf[50_001..50_011]);
    }

    #[test]
    fn quoted_printable_and_identity_parts_decode() {
        let msg = b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\nContent-Type: text/csv; name=t.csv\r\n\
            Content-Transfer-Encoding: quoted-printable\r\n\r\na=3Db  \r\nlong=\r\nline=\r\n--q\r\n\
            Content-Type: application/octet-stream; name=raw.bin\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\x01\xff\r\n--q--\r\n";
        let parts = find(msg);
        let [t, r] = parts.attachments.as_slice() else { panic!("{parts:?}") };
        assert_eq!(t.read_all(msg), b"a=b\r\nlongline");
        assert_eq!(t.size, 13);
        assert_eq!(r.read_all(msg), b"\x00\x01\xff");
        assert_eq!(r.content_type, "application/octet-stream");
    }

    #[test]
    fn base64_size_counts_without_decoding() {
        for n in 0..20 {
            let data = bytes(n, 0);
            assert_eq!(base64_size(wrapped(&data).as_bytes()), n as u64);
        }
    }
}
