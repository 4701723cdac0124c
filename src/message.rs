//! What the relay changes in a message's header section before it is spooled.
//!
//! - A `Received:` trace field on top (RFC 5321 4.4: a relay MUST add one).
//! - With `from = "rewrite"`: the message carries exactly one `From:` with exactly one
//!   mailbox, the identity's (Exchange answers `554 5.2.252 SendAsDenied` otherwise, Gmail
//!   rewrites or refuses). Every `From:`, `Sender:` and `Resent-*:` field the device sent is
//!   removed by a byte-level scan of the header section; the new From is built from the
//!   device's parsed display name (a quoted-string, RFC 5322 3.2.4, or RFC 2047 encoded-words
//!   when it is not ASCII), and the device's address becomes `Reply-To:` when it sent one
//!   usable mailbox and no Reply-To, so replies still reach the person.
//! - `Date:` and `Message-ID:` when missing (RFC 6409 8.2, 8.3: a submission server may add
//!   them; Gmail refuses messages without a Message-ID).
//! - A malformed header section is repaired as Postfix's cleanup does: the first line that is
//!   neither a header field nor a continuation line ends the header section and starts the
//!   body, and the empty line (RFC 5322 2.1) is inserted before it. Whitespace-only
//!   continuation lines (which some readers take for the empty line) are dropped, and header
//!   lines over 998 characters are folded (RFC 5322 2.1.1, 2.2.3).
//!
//! The body is never touched. [`HeaderScanner`] finds the end of the header section while the
//! message arrives, looking at each byte once; [`rewrite_start`] then builds the new header
//! section. Only what cannot be made valid is refused ([`Refusal`]).

use mail_parser::{Address, HeaderValue, MessageParser};

pub mod attachments;
pub mod invariant;
pub mod links;
pub mod recipients;

/// The header section may be at most this large; beyond it the message is refused, since it
/// cannot be a scan's header and would be held in memory.
pub const MAX_HEADER_SECTION: usize = 256 * 1024;

/// RFC 5322 2.1.1: a line is at most 998 characters, without the CRLF.
pub const MAX_LINE: usize = 998;

/// Longest display name kept (in characters); a printer's name is far shorter.
const MAX_DISPLAY_NAME: usize = 100;

/// How to change the header section.
pub struct Changes<'a> {
    /// The `Received:` field, without the trailing CRLF.
    pub received: &'a str,
    /// Rewrite From to this address.
    pub rewrite_from: Option<&'a str>,
    /// Our host name, for a Message-ID we add.
    pub hostname: &'a str,
    /// Unique part for a Message-ID we add.
    pub unique: &'a str,
    /// For a Date we add.
    pub now: chrono::DateTime<chrono::Utc>,
}

/// Why a message cannot be made valid; the device gets a permanent refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the header section is larger than {MAX_HEADER_SECTION} bytes")]
    HeaderTooBig,
    /// RFC 5322 2.1.1; a line can be folded only where it has whitespace.
    #[error("header field \"{0}\" has a line longer than {MAX_LINE} characters that cannot be folded")]
    LongLine(String),
}

impl Refusal {
    /// The reason counted in the metrics.
    pub fn reason(&self) -> crate::metrics::RejectReason {
        match self {
            Refusal::HeaderTooBig => crate::metrics::RejectReason::TooBig,
            Refusal::LongLine(_) => crate::metrics::RejectReason::BadHeader,
        }
    }
}

/// Where the header section ends, as found by [`HeaderScanner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// Length of the header section (complete lines, each with its CRLF).
    header: usize,
    kind: SplitKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SplitKind {
    /// The empty line follows the header section.
    EmptyLine,
    /// A line that is no header field follows: it starts the body; the empty line is missing.
    BodyLine,
    /// The message is all header section (no empty line, no body).
    NoBody,
}

impl Split {
    /// The length of the device's header section.
    pub fn header_len(&self) -> usize {
        self.header
    }
}

/// Where the scanner is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// At the start of a line.
    Start,
    /// Saw CR at the start of a line.
    StartCr,
    /// In a field name.
    Name,
    /// Whitespace between a field name and its colon (obsolete syntax, RFC 5322 4.5.3).
    NameWsp,
    /// In a field's value or in a continuation line.
    Value,
    /// Saw CR in a value.
    ValueCr,
}

/// Finds the end of the header section while the message arrives: each byte is looked at
/// once, however the message is cut into reads.
///
/// A header line is a field (`ftext+ WSP* ":" value`, RFC 5322 2.2, 3.6.8, 4.5.3) or, after
/// one, a continuation line (starting with a space or tab, RFC 5322 2.2.3), ending with CRLF
/// and free of NUL and bare CR or LF. The empty line ends the header section; so does, as in
/// Postfix's cleanup, the first line that is not a header line: it is the first body line.
#[derive(Debug)]
pub struct HeaderScanner {
    state: Scan,
    /// Bytes of the buffer looked at so far.
    pos: usize,
    /// Where the current line starts.
    line: usize,
    /// A field has been seen, so a line starting with whitespace continues it.
    in_field: bool,
}

impl Default for HeaderScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderScanner {
    /// A scanner at the start of the message.
    pub fn new() -> Self {
        HeaderScanner { state: Scan::Start, pos: 0, line: 0, in_field: false }
    }

    /// Looks at what `buf` gained since the last call (`buf` only grows: the message so
    /// far). `Ok(None)`: the header section goes on.
    pub fn find(&mut self, buf: &[u8]) -> Result<Option<Split>, Refusal> {
        while let Some(&b) = buf.get(self.pos) {
            self.pos += 1;
            if self.pos > MAX_HEADER_SECTION {
                return Err(Refusal::HeaderTooBig);
            }
            // A field name and its colon must fit in a line (RFC 5322 2.1.1): a longer run of
            // name characters is a body line (a long base64 line, say).
            if matches!(self.state, Scan::Name | Scan::NameWsp) && self.pos - self.line > MAX_LINE {
                return self.split(SplitKind::BodyLine);
            }
            self.state = match (self.state, b) {
                (Scan::Start, b'\r') => Scan::StartCr,
                (Scan::Start, b' ' | b'\t') if self.in_field => Scan::Value,
                (Scan::Start, b) if is_ftext(b) => Scan::Name,
                (Scan::StartCr, b'\n') => return self.split(SplitKind::EmptyLine),
                (Scan::Name, b) if is_ftext(b) => Scan::Name,
                (Scan::Name | Scan::NameWsp, b' ' | b'\t') => Scan::NameWsp,
                (Scan::Name | Scan::NameWsp, b':') => Scan::Value,
                (Scan::Value, b'\r') => Scan::ValueCr,
                (Scan::Value, 0 | b'\n') => return self.split(SplitKind::BodyLine),
                (Scan::Value, _) => Scan::Value,
                (Scan::ValueCr, b'\n') => {
                    self.in_field = true;
                    self.line = self.pos;
                    Scan::Start
                }
                // Anything else: this line is no header line, so it is the first body line.
                _ => return self.split(SplitKind::BodyLine),
            };
        }
        Ok(None)
    }

    /// At the end of the data: where the header section ends.
    pub fn finish(&mut self, buf: &[u8]) -> Result<Split, Refusal> {
        if let Some(split) = self.find(buf)? {
            return Ok(split);
        }
        // A last line without CRLF is no complete header line.
        let kind = if self.state == Scan::Start { SplitKind::NoBody } else { SplitKind::BodyLine };
        Ok(Split { header: self.line, kind })
    }

    /// The header section ends where the current line starts.
    fn split(&self, kind: SplitKind) -> Result<Option<Split>, Refusal> {
        Ok(Some(Split { header: self.line, kind }))
    }
}

/// RFC 5322 3.6.8: printable US-ASCII but the colon.
fn is_ftext(b: u8) -> bool {
    matches!(b, 33..=57 | 59..=126)
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// The start of the message to spool: the new header section, the empty line (inserted when
/// the device left it out), and the body bytes of `buf` from `split` on, unchanged. `split`
/// must come from a [`HeaderScanner`] that read `buf`.
pub fn rewrite_start(buf: &[u8], split: Split, c: &Changes<'_>) -> Result<Vec<u8>, Refusal> {
    let at = split.header.min(buf.len());
    let (header, rest) = buf.split_at(at);
    let mut out = rewrite_header(header, c)?;
    match split.kind {
        SplitKind::EmptyLine => out.extend_from_slice(rest),
        SplitKind::BodyLine => {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(rest);
        }
        SplitKind::NoBody => {}
    }
    Ok(out)
}

/// Rewrites a whole message (tests and fuzzing; the session streams with [`HeaderScanner`]).
pub fn rewrite_message(msg: &[u8], c: &Changes<'_>) -> Result<Vec<u8>, Refusal> {
    let split = HeaderScanner::new().finish(msg)?;
    rewrite_start(msg, split, c)
}

/// One header field of the device's header section.
struct Field<'a> {
    /// The name, without whitespace before the colon.
    name: &'a [u8],
    /// The first line after the colon.
    value: &'a [u8],
    /// Continuation lines, without CRLF.
    more: Vec<&'a [u8]>,
}

impl Field<'_> {
    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }

    /// The field as it is spooled: no whitespace before the colon, no whitespace-only
    /// continuation lines, lines folded to 998 characters.
    fn write(&self, out: &mut Vec<u8>) -> Result<(), Refusal> {
        let mut first = Vec::with_capacity(self.name.len() + 1 + self.value.len());
        first.extend_from_slice(self.name);
        first.push(b':');
        first.extend_from_slice(self.value);
        self.line(&first, out)?;
        for m in self.more.iter().filter(|m| !m.iter().all(|&b| is_wsp(b))) {
            self.line(m, out)?;
        }
        Ok(())
    }

    /// Writes one line with CRLF, folded before whitespace when it is too long (RFC 5322
    /// 2.2.3: unfolding gives back the same value).
    fn line(&self, line: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
        let mut rest = line;
        if rest.len() > MAX_LINE {
            // Trailing whitespace would become a whitespace-only line; it means nothing.
            while rest.last().is_some_and(|&b| is_wsp(b)) {
                rest = &rest[..rest.len() - 1];
            }
        }
        while rest.len() > MAX_LINE {
            // Fold at the start of a run of whitespace, so both parts have other characters.
            let at = (1..=MAX_LINE).rev().find(|&i| is_wsp(rest[i]) && !is_wsp(rest[i - 1]));
            let Some(at) = at else {
                let name: String = String::from_utf8_lossy(self.name).chars().take(40).collect();
                return Err(Refusal::LongLine(name));
            };
            out.extend_from_slice(&rest[..at]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[at..];
        }
        out.extend_from_slice(rest);
        out.extend_from_slice(b"\r\n");
        Ok(())
    }
}

/// Splits a header section found by [`HeaderScanner`] into its fields.
fn fields(header: &[u8]) -> Vec<Field<'_>> {
    let mut out: Vec<Field<'_>> = Vec::new();
    let mut rest = header;
    while !rest.is_empty() {
        let n = rest.windows(2).position(|w| w == b"\r\n").unwrap_or(rest.len());
        let line = &rest[..n];
        rest = rest.get(n + 2..).unwrap_or(&[]);
        if line.first().is_some_and(|&b| is_wsp(b)) {
            if let Some(f) = out.last_mut() {
                f.more.push(line);
            }
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let mut name = &line[..colon];
        while name.last().is_some_and(|&b| is_wsp(b)) {
            name = &name[..name.len() - 1];
        }
        if name.is_empty() {
            continue;
        }
        out.push(Field { name, value: &line[colon + 1..], more: Vec::new() });
    }
    out
}

/// The device's From, when it is exactly one mailbox: (display name, address).
fn device_mailbox(from: &Field<'_>) -> Option<(Option<String>, Option<String>)> {
    let mut probe = b"From:".to_vec();
    probe.extend_from_slice(from.value);
    for m in &from.more {
        probe.extend_from_slice(b"\r\n");
        probe.extend_from_slice(m);
    }
    probe.extend_from_slice(b"\r\n\r\n");
    let parsed = MessageParser::default().parse_headers(&probe)?;
    let header = parsed.headers().first()?;
    let HeaderValue::Address(Address::List(list)) = &header.value else {
        return None;
    };
    let [one] = list.as_slice() else {
        return None;
    };
    Some((one.name.as_deref().map(str::to_string), one.address.as_deref().map(str::to_string)))
}

/// An address that can go between `<` and `>` as it is.
fn usable_address(a: &str) -> bool {
    a.bytes().all(|b| b.is_ascii_graphic() && !b"<>\"\\,;:()[]".contains(&b)) && a.parse::<lettre::Address>().is_ok()
}

/// A display name made safe: no controls or invisible formatting characters (a bidi override
/// could make the name read differently), whitespace collapsed, at most 100 characters.
fn clean_display_name(raw: &str) -> Option<String> {
    let invisible = |c: char| matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}');
    let mut out = String::new();
    let mut chars = 0;
    let mut gap = false;
    for ch in raw.chars() {
        if invisible(ch) {
            continue;
        }
        if ch.is_whitespace() || ch.is_control() {
            gap = true;
            continue;
        }
        if chars >= MAX_DISPLAY_NAME {
            break;
        }
        if gap && !out.is_empty() {
            out.push(' ');
            chars += 1;
        }
        gap = false;
        out.push(ch);
        chars += 1;
    }
    (!out.is_empty()).then_some(out)
}

/// A display name as a phrase: a quoted-string (RFC 5322 3.2.4) when it is printable ASCII,
/// else RFC 2047 encoded-words (UTF-8, base64, at most 75 characters each, one per line).
fn phrase(name: &str) -> String {
    if name.bytes().all(|b| (0x20..0x7f).contains(&b)) && !name.contains("=?") {
        let mut q = String::with_capacity(name.len() + 2);
        q.push('"');
        for ch in name.chars() {
            if ch == '"' || ch == '\\' {
                q.push('\\');
            }
            q.push(ch);
        }
        q.push('"');
        return q;
    }
    use base64::Engine;
    // 45 bytes are 60 base64 characters: "=?UTF-8?B?" + 60 + "?=" is 72 (RFC 2047 2: <= 75).
    let mut words = Vec::new();
    let mut start = 0;
    while start < name.len() {
        let mut end = (start + 45).min(name.len());
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(&name.as_bytes()[start..end]);
        words.push(format!("=?UTF-8?B?{b64}?="));
        start = end;
    }
    words.join("\r\n ")
}

/// `phrase <address>`, or the bare address without a name.
fn mailbox(name: Option<&str>, address: &str) -> String {
    match name {
        Some(n) => format!("{} <{address}>", phrase(n)),
        None => address.to_string(),
    }
}

/// The new header section for `header` (complete header lines as found by
/// [`HeaderScanner`]; the empty line is not part of it).
fn rewrite_header(header: &[u8], c: &Changes<'_>) -> Result<Vec<u8>, Refusal> {
    let mut out = Vec::with_capacity(header.len() + 512);
    out.extend_from_slice(c.received.as_bytes());
    out.extend_from_slice(b"\r\n");

    let all = fields(header);
    let mut extra = String::new();
    let kept: Vec<&Field<'_>> = match c.rewrite_from {
        None => all.iter().collect(),
        Some(identity) => {
            let froms: Vec<&Field<'_>> = all.iter().filter(|f| f.is("From")).collect();
            let (name, address) = match froms.as_slice() {
                [one] => device_mailbox(one).unwrap_or((None, None)),
                _ => (None, None),
            };
            let name = name.as_deref().and_then(clean_display_name);
            extra.push_str(&format!("From: {}\r\n", mailbox(name.as_deref(), identity)));
            let kept: Vec<&Field<'_>> = all
                .iter()
                .filter(|f| {
                    !(f.is("From")
                        || f.is("Sender")
                        || f.name.get(..7).is_some_and(|p| p.eq_ignore_ascii_case(b"Resent-")))
                })
                .collect();
            let has_reply_to = kept.iter().any(|f| f.is("Reply-To"));
            if let Some(a) = address.filter(|a| usable_address(a) && !a.eq_ignore_ascii_case(identity)) {
                if !has_reply_to {
                    extra.push_str(&format!("Reply-To: {}\r\n", mailbox(name.as_deref(), &a)));
                }
            }
            kept
        }
    };
    if !kept.iter().any(|f| f.is("Date")) {
        extra.push_str(&format!("Date: {}\r\n", c.now.to_rfc2822()));
    }
    if !kept.iter().any(|f| f.is("Message-ID")) {
        extra.push_str(&format!("Message-ID: <{}@{}>\r\n", c.unique, c.hostname));
    }
    for f in kept {
        f.write(&mut out)?;
    }
    out.extend_from_slice(extra.as_bytes());
    Ok(out)
}

/// The `Received:` field for a message (RFC 5321 4.4), without CRLF.
/// A header field value from text: control characters become spaces, and text that is not
/// ASCII becomes one RFC 2047 encoded-word (UTF-8, base64).
pub fn header_text(s: &str) -> String {
    use base64::Engine as _;
    let s: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().trim().to_string();
    if s.is_ascii() {
        s
    } else {
        format!("=?utf-8?B?{}?=", base64::engine::general_purpose::STANDARD.encode(s.as_bytes()))
    }
}

pub fn received_field(
    helo: &str,
    client_ip: &str,
    hostname: &str,
    with: &str,
    queue_id: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    format!(
        "Received: from {helo} ([{client_ip}])\r\n\tby {hostname} (mfd-relay) with {with} id {queue_id};\r\n\t{}",
        now.to_rfc2822()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "scans@contoso.com";

    fn changes(rewrite: Option<&str>) -> Changes<'_> {
        Changes {
            received: "Received: from x",
            rewrite_from: rewrite,
            hostname: "relay.lan",
            unique: "ABC",
            now: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        }
    }

    fn s(v: Vec<u8>) -> String {
        String::from_utf8(v).unwrap()
    }

    /// The old `rewrite_header(header)` calls: a header section without the empty line.
    fn rewrite_header(h: &[u8], c: &Changes<'_>) -> Vec<u8> {
        rewrite_message(h, c).unwrap()
    }

    /// Rewrites and checks the invariant; returns the output.
    fn checked(msg: &[u8], identity: Option<&str>) -> String {
        let out = rewrite_message(msg, &changes(identity)).unwrap();
        if let Err(e) = invariant::check(msg, &out, identity) {
            panic!("{e}\ninput:  {:?}\noutput: {:?}", String::from_utf8_lossy(msg), String::from_utf8_lossy(&out));
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Feeds `msg` to a scanner in pieces of `step` bytes.
    fn scan_in_pieces(msg: &[u8], step: usize) -> Result<Option<Split>, Refusal> {
        let mut sc = HeaderScanner::new();
        let mut end = 0;
        while end < msg.len() {
            end = (end + step).min(msg.len());
            if let Some(split) = sc.find(&msg[..end])? {
                return Ok(Some(split));
            }
        }
        Ok(None)
    }

    #[test]
    fn header_end_finds_the_empty_line() {
        let found = |b: &[u8]| scan_in_pieces(b, 1).unwrap();
        assert_eq!(found(b"A: b\r\nC: d\r\n\r\nbody"), Some(Split { header: 12, kind: SplitKind::EmptyLine }));
        assert_eq!(found(b"\r\nbody"), Some(Split { header: 0, kind: SplitKind::EmptyLine }));
        assert_eq!(found(b"A: b\r\nC: d\r\n"), None);
        // Cut anywhere, the answer is the same.
        let msg = b"A: b\r\n c\r\nSubject : d\r\n\r\nbody";
        for step in 1..msg.len() {
            assert_eq!(scan_in_pieces(msg, step).unwrap(), Some(Split { header: 23, kind: SplitKind::EmptyLine }));
        }
    }

    #[test]
    fn first_line_that_is_no_header_starts_the_body() {
        let found = |b: &[u8]| scan_in_pieces(b, 3).unwrap().map(|s| (s.header, s.kind));
        let body = Some((0, SplitKind::BodyLine));
        assert_eq!(found(b"   \r\nFrom: a@b\r\n\r\n"), body, "whitespace first");
        assert_eq!(found(b"\tFrom: a@b\r\n"), body, "continuation of nothing");
        assert_eq!(found(b"hello there\r\n"), body, "body only");
        assert_eq!(found(b"%PDF-1.4\r\n"), body);
        assert_eq!(found(b"From\r\n"), body, "no colon");
        assert_eq!(found(b": x\r\n"), body, "empty name");
        assert_eq!(found(b"Fr\xc3\xb6m: x\r\n"), body, "8-bit name");
        let second = Some((9, SplitKind::BodyLine));
        assert_eq!(found(b"To: a@b\r\nno header\r\n"), second);
        assert_eq!(found(b"To: a@b\r\nX: \0\r\n"), second, "NUL");
        assert_eq!(found(b"To: a@b\r\nX: a\nFrom: c@d\r\n"), second, "bare LF");
        assert_eq!(found(b"To: a@b\r\nX: a\rFrom: c@d\r\n"), second, "bare CR");
        assert_eq!(found(b"To: a@b\r\n\r\r\n"), second, "CR CR LF");
        // A whitespace-only line after a field continues it.
        assert_eq!(found(b"To: a@b\r\n \r\nX: y\r\n\r\n"), Some((18, SplitKind::EmptyLine)));
        // A huge first body line is recognised without waiting for its end.
        let big = vec![b'A'; 400_000];
        assert_eq!(found(&big), body);
        // A colon after 998 characters makes no field either.
        let mut long_name = vec![b'A'; 998];
        long_name.extend_from_slice(b": x\r\n");
        assert_eq!(found(&long_name), body);
        long_name.remove(0);
        assert_eq!(found(&long_name), None);
    }

    #[test]
    fn header_section_limit_is_256_kib() {
        let mut msg = Vec::new();
        while msg.len() <= MAX_HEADER_SECTION {
            msg.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
        }
        assert_eq!(scan_in_pieces(&msg, 4096), Err(Refusal::HeaderTooBig));
        assert_eq!(rewrite_message(&msg, &changes(None)), Err(Refusal::HeaderTooBig));
        // One endless field line too.
        let mut line = b"X-Long: ".to_vec();
        line.extend(vec![b'a'; MAX_HEADER_SECTION + 1]);
        assert_eq!(scan_in_pieces(&line, 4096), Err(Refusal::HeaderTooBig));
        // Under the limit is fine.
        msg.truncate(200 * 1024);
        let cut = msg.len() - msg.len() % 52;
        msg.truncate(cut);
        msg.extend_from_slice(b"\r\nbody\r\n");
        assert!(rewrite_message(&msg, &changes(None)).is_ok());
    }

    #[test]
    fn scanning_is_linear() {
        // 200 KiB of header arriving one byte at a time: each byte is looked at once.
        let mut msg = Vec::new();
        while msg.len() < 200 * 1024 {
            msg.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
        }
        let mut sc = HeaderScanner::new();
        let t = std::time::Instant::now();
        for end in 1..=msg.len() {
            assert_eq!(sc.find(&msg[..end]), Ok(None));
        }
        assert_eq!(sc.pos, msg.len());
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn keep_adds_trace_and_missing_fields_only() {
        let h = b"From: scanner@printer.local\r\nSubject: Scan\r\n";
        let out = s(rewrite_header(h, &changes(None)));
        assert!(out.starts_with("Received: from x\r\nFrom: scanner@printer.local\r\nSubject: Scan\r\n"));
        assert!(out.contains("\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n"));
        assert!(out.ends_with("Message-ID: <ABC@relay.lan>\r\n"));
        let full = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@y>\r\n";
        assert_eq!(
            s(rewrite_header(full, &changes(None))),
            "Received: from x\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@y>\r\n"
        );
    }

    #[test]
    fn keep_repairs_a_malformed_header_section_too() {
        let out = checked(b"From: a@b.c\r\nSender: x@y.z\r\nscan attached\r\nline 2\r\n", None);
        assert_eq!(
            out,
            "Received: from x\r\nFrom: a@b.c\r\nSender: x@y.z\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n\
             Message-ID: <ABC@relay.lan>\r\n\r\nscan attached\r\nline 2\r\n"
        );
    }

    #[test]
    fn rewrite_from_keeps_name_and_adds_reply_to() {
        let h = b"From: \"Floor 3 Scanner\" <scanner@printer.local>\r\nSender: x@y\r\nSubject: Scan\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@p>\r\n";
        let out = s(rewrite_header(h, &changes(Some(ID))));
        assert!(!out.contains("Sender:"), "{out}");
        assert!(!out.contains("From: \"Floor 3 Scanner\" <scanner@printer.local>"), "{out}");
        assert!(out.contains("From: \"Floor 3 Scanner\" <scans@contoso.com>\r\n"), "{out}");
        assert!(out.contains("Reply-To: \"Floor 3 Scanner\" <scanner@printer.local>\r\n"), "{out}");
        assert!(out.contains("Subject: Scan\r\n"));
        let parsed = mail_parser::MessageParser::default().parse(out.as_bytes()).unwrap();
        assert_eq!(parsed.from().unwrap().first().unwrap().address(), Some("scans@contoso.com"));
    }

    #[test]
    fn rewrite_respects_existing_reply_to_and_missing_from() {
        let h = b"From: a@b.c\r\nReply-To: boss@b.c\r\n";
        let out = s(rewrite_header(h, &changes(Some(ID))));
        assert!(out.contains("From: scans@contoso.com\r\n"));
        assert_eq!(out.matches("Reply-To:").count(), 1);
        let out = s(rewrite_header(b"Subject: x\r\n", &changes(Some(ID))));
        assert!(out.contains("From: scans@contoso.com\r\n") && !out.contains("Reply-To"));
        let out = s(rewrite_header(b"From: Scans@Contoso.com\r\n", &changes(Some(ID))));
        assert!(!out.contains("Reply-To"), "{out}");
    }

    #[test]
    fn folded_from_is_replaced_whole() {
        let h = b"From: \"Long Name\"\r\n <a@b.c>\r\nTo: x@y\r\n";
        let out = s(rewrite_header(h, &changes(Some("s@c.d"))));
        assert!(!out.contains("<a@b.c>\r\nTo") && out.contains("To: x@y\r\n"), "{out}");
        assert!(out.contains("Reply-To: \"Long Name\" <a@b.c>\r\n"), "{out}");
    }

    #[test]
    fn garbage_header_is_survived() {
        let out = rewrite_header(b"\x00\xff garbage without colon\r\n", &changes(Some("s@c.d")));
        assert!(String::from_utf8_lossy(&out).contains("From: s@c.d\r\n"));
        let _ = rewrite_header(b"", &changes(None));
        // The garbage is the body now, after the inserted empty line.
        assert!(out.ends_with(b"\r\n\r\n\x00\xff garbage without colon\r\n"));
    }

    #[test]
    fn whitespace_first_line_cannot_hide_the_device_from() {
        let msg = b"  \r\nFrom: dev@printer.local\r\nSender: ceo@contoso.com\r\nSubject: x\r\n\r\nbody\r\n";
        let out = checked(msg, Some(ID));
        // Nothing of the device's is a header any more: it all starts the body.
        assert_eq!(
            out,
            "Received: from x\r\nFrom: scans@contoso.com\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n\
             Message-ID: <ABC@relay.lan>\r\n\r\n  \r\nFrom: dev@printer.local\r\nSender: ceo@contoso.com\r\nSubject: x\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn address_list_keeps_no_other_mailbox() {
        let out = checked(b"From: ceo@contoso.test, <dev@x.test>\r\nSubject: x\r\n\r\nb\r\n", Some(ID));
        assert!(out.contains("\r\nFrom: scans@contoso.com\r\n"), "{out}");
        assert!(!out.contains("ceo@") && !out.contains("dev@x") && !out.contains("Reply-To"), "{out}");
        // A group and two From fields likewise.
        for msg in [
            &b"From: Team: ceo@contoso.test, dev@x.test;\r\n\r\nb\r\n"[..],
            b"From: ceo@contoso.test\r\nFROM : dev@x.test\r\n\r\nb\r\n",
        ] {
            let out = checked(msg, Some(ID));
            assert!(!out.contains("ceo@") && !out.contains("dev@x"), "{out}");
        }
    }

    #[test]
    fn quoted_angle_bracket_in_the_name_stays_quoted() {
        let out = checked(b"From: \"Smith <boss>\" <dev@x.test>\r\n\r\nb\r\n", Some(ID));
        assert!(out.contains("\r\nFrom: \"Smith <boss>\" <scans@contoso.com>\r\n"), "{out}");
        assert!(out.contains("\r\nReply-To: \"Smith <boss>\" <dev@x.test>\r\n"), "{out}");
        // Quotes and backslashes are escaped (RFC 5322 3.2.4).
        let out = checked(b"From: \"a \\\"b\\\" \\\\ c@d.e\" <dev@x.test>\r\n\r\nb\r\n", Some(ID));
        assert!(out.contains("\r\nFrom: \"a \\\"b\\\" \\\\ c@d.e\" <scans@contoso.com>\r\n"), "{out}");
    }

    #[test]
    fn non_ascii_name_is_encoded_and_controls_are_dropped() {
        let msg = "From: =?ISO-8859-1?Q?Acc=E8s_=E9tage?= <dev@x.test>\r\n\r\nb\r\n";
        let out = checked(msg.as_bytes(), Some(ID));
        let from = out.split("\r\nFrom: ").nth(1).unwrap();
        assert!(from.starts_with("=?UTF-8?B?"), "{out}");
        let parsed = mail_parser::MessageParser::default().parse(out.as_bytes()).unwrap();
        let addr = parsed.from().unwrap().first().unwrap();
        assert_eq!((addr.name(), addr.address()), (Some("Accès étage"), Some(ID)));
        // A long name with a bidi override: encoded-words of at most 75 characters.
        let name: String = "é\u{202E}".repeat(200);
        let out = checked(format!("From: \"{name}\" <dev@x.test>\r\n\r\nb\r\n").as_bytes(), Some(ID));
        assert!(!out.contains('\u{202E}'));
        let parsed = mail_parser::MessageParser::default().parse(out.as_bytes()).unwrap();
        let addr = parsed.from().unwrap().first().unwrap();
        assert_eq!(addr.name().unwrap(), "é".repeat(MAX_DISPLAY_NAME));
        // An ASCII name that looks like an encoded-word is encoded, so it shows as it is.
        assert_eq!(phrase("=?x?="), "=?UTF-8?B?PT94Pz0=?=");
    }

    #[test]
    fn resent_and_sender_fields_are_removed() {
        let msg = b"Resent-From: ceo@contoso.test\r\nRESENT-SENDER: ceo@contoso.test\r\nresent-date: x\r\nSender : ceo@contoso.test\r\nFrom: a@b.c\r\n\r\nb\r\n";
        let out = checked(msg, Some(ID));
        assert!(!out.to_ascii_lowercase().contains("resent") && !out.contains("ceo@"), "{out}");
        assert!(!out.contains("Sender"), "{out}");
        // With from = "keep" they stay.
        let out = checked(msg, None);
        assert!(out.contains("Resent-From: ceo@contoso.test\r\n") && out.contains("Sender: ceo@contoso.test\r\n"));
    }

    #[test]
    fn body_only_message_gets_a_header_section() {
        let out = checked(b"Please find the scan attached.\r\n", Some(ID));
        assert!(out.ends_with("Message-ID: <ABC@relay.lan>\r\n\r\nPlease find the scan attached.\r\n"), "{out}");
        assert!(out.starts_with("Received: from x\r\nFrom: scans@contoso.com\r\n"), "{out}");
    }

    #[test]
    fn whitespace_only_continuations_are_dropped_and_long_lines_folded() {
        let msg = b"Subject: a\r\n \r\n\t\r\n b\r\n\r\nbody\r\n";
        let out = checked(msg, None);
        assert!(out.contains("\r\nSubject: a\r\n b\r\n"), "{out}");
        let long = format!("X-Long: {}\r\n\r\nb\r\n", "word ".repeat(500));
        let out = checked(long.as_bytes(), None);
        assert!(out.lines().all(|l| l.len() <= MAX_LINE), "{out}");
        let unfolded = out.replace("\r\n ", " ");
        assert!(unfolded.contains(&format!("X-Long: {}\r\n", "word ".repeat(500).trim_end())), "{out}");
        // No whitespace to fold at: cannot be made valid.
        let long = format!("X-Long: {}\r\n\r\nb\r\n", "x".repeat(1200));
        assert_eq!(rewrite_message(long.as_bytes(), &changes(None)), Err(Refusal::LongLine("X-Long".into())));
        // Unless it is a From the rewrite removes anyway.
        let long = format!("From: {}\r\n\r\nb\r\n", "x".repeat(1200));
        checked(long.as_bytes(), Some(ID));
    }

    /// A small deterministic fuzzer over hostile pieces, so the invariant is exercised by
    /// every `cargo test` (fuzz/ runs the same check with libFuzzer).
    #[test]
    fn rewrite_keeps_the_invariant_on_random_hostile_input() {
        const PIECES: &[&[u8]] = &[
            b"From: ",
            b"FROM :",
            b"Sender: ",
            b"Resent-From: ",
            b"Reply-To: ",
            b"Date: x",
            b"Message-ID: <a@b>",
            b"Subject: ",
            b"\r\n",
            b"\r\n",
            b"\r\n",
            b"\n",
            b"\r",
            b" ",
            b"\t",
            b"\0",
            b"\"",
            b"\\",
            b"<",
            b">",
            b"@",
            b",",
            b":",
            b";",
            b"(",
            b")",
            b"a",
            b"dev@x.test",
            b"ceo@contoso.test",
            b"=?UTF-8?B?w6k=?=",
            b"=?",
            b"?=",
            b"\xc3\xa9",
            b"\xff",
            b"\r\n\r\n",
            b"body",
            b"\xe2\x80\xae",
            b"Team:",
            &[b'x'; 400],
            &[b' '; 300],
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let rounds = std::env::var("REWRITE_FUZZ_ROUNDS").ok().and_then(|n| n.parse().ok()).unwrap_or(20_000);
        for _ in 0..rounds {
            let n = next() % 24;
            let mut msg = Vec::new();
            for _ in 0..n {
                msg.extend_from_slice(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            if next() % 3 == 0 {
                msg.extend_from_slice(b"\r\n");
            }
            for identity in [Some(ID), None] {
                match rewrite_message(&msg, &changes(identity)) {
                    Ok(out) => {
                        if let Err(e) = invariant::check(&msg, &out, identity) {
                            panic!(
                                "{e}\ninput:  {:?}\noutput: {:?}",
                                String::from_utf8_lossy(&msg),
                                String::from_utf8_lossy(&out)
                            );
                        }
                    }
                    // Only a line too long to fold is refused.
                    Err(Refusal::LongLine(_)) if msg.split(|&b| b == b'\n').any(|l| l.len() > MAX_LINE) => {}
                    Err(e) => panic!("refused {e}: {:?}", String::from_utf8_lossy(&msg)),
                }
            }
        }
    }
}
