//! The invariant of the header rewrite, checked independently of
//! [`HeaderScanner`](super::HeaderScanner): the fuzz target (fuzz/fuzz_targets/header_rewrite.rs)
//! and the unit tests call [`check`] on each input and its output.
//!
//! - The output starts with a valid header section (RFC 5322 2.1, 2.2): lines ending with
//!   CRLF, at most 998 characters, without NUL or bare CR or LF, each a field (`ftext+ ":"`)
//!   or a continuation of one (whitespace, then something else); the first is `Received:`.
//! - With an identity: exactly one From field, holding exactly one mailbox, the identity's
//!   (as `addr`, or `phrase <addr>` where the phrase is a quoted-string or RFC 2047
//!   encoded-words); no Sender and no Resent-* field; mail-parser reads the same.
//! - After the header section: the device's body bytes unchanged, behind the empty line. The
//!   device's body starts at its empty line or at its first line that is neither a header
//!   field nor a continuation line.

use mail_parser::{Address, MessageParser};

/// One field of the output: its name and its unfolded value.
struct Field {
    name: String,
    value: Vec<u8>,
}

/// Checks `output`, the rewrite of `input`; `identity` when From was rewritten.
pub fn check(input: &[u8], output: &[u8], identity: Option<&str>) -> Result<(), String> {
    let (fields, header_len) = header_section(output)?;
    if fields.first().map(|f| f.name.as_str()) != Some("Received") {
        return Err("the first field is not Received".into());
    }
    let rest = &output[header_len..];
    let expected = device_rest(input);
    if rest != expected.as_slice() {
        return Err(format!(
            "body changed: expected {:?}, got {:?}",
            String::from_utf8_lossy(&expected),
            String::from_utf8_lossy(rest)
        ));
    }
    let Some(identity) = identity else {
        return Ok(());
    };
    let froms: Vec<&Field> = fields.iter().filter(|f| f.name.eq_ignore_ascii_case("From")).collect();
    let [from] = froms.as_slice() else {
        return Err(format!("{} From fields", froms.len()));
    };
    if let Some(f) = fields
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case("Sender") || f.name.to_ascii_lowercase().starts_with("resent-"))
    {
        return Err(format!("the device's {} field is left", f.name));
    }
    let value = String::from_utf8_lossy(&from.value);
    let value = value.trim_matches([' ', '\t']);
    if value != identity {
        let phrase = value
            .strip_suffix(&format!(" <{identity}>"))
            .ok_or_else(|| format!("From is not the identity's mailbox: {value:?}"))?;
        if !quoted_string(phrase) && !encoded_words(phrase) {
            return Err(format!("From's display name is not a quoted-string or encoded-words: {phrase:?}"));
        }
    }
    let mut head = output[..header_len].to_vec();
    head.extend_from_slice(b"\r\n");
    let parsed = MessageParser::default().parse_headers(&head).ok_or("mail-parser reads no header")?;
    match parsed.from() {
        Some(Address::List(list)) if list.len() == 1 => {
            if !list[0].address().is_some_and(|a| a.eq_ignore_ascii_case(identity)) {
                return Err(format!("mail-parser reads From as {:?}", list[0]));
            }
        }
        other => return Err(format!("mail-parser reads From as {other:?}")),
    }
    if parsed.sender().is_some() {
        return Err("mail-parser reads a Sender".into());
    }
    Ok(())
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The output's header section: its fields and its length (up to the empty line or the end).
fn header_section(out: &[u8]) -> Result<(Vec<Field>, usize), String> {
    let mut fields: Vec<Field> = Vec::new();
    let mut i = 0;
    while i < out.len() {
        let n = crlf(&out[i..]).ok_or("a header line without CRLF")?;
        let line = &out[i..i + n];
        if line.is_empty() {
            return Ok((fields, i));
        }
        let shown = || String::from_utf8_lossy(line).into_owned();
        if line.len() > 998 {
            return Err(format!("a header line of {} characters", line.len()));
        }
        if line.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
            return Err(format!("NUL or bare CR/LF in a header line: {:?}", shown()));
        }
        if is_wsp(line[0]) {
            let f = fields.last_mut().ok_or_else(|| format!("a continuation line first: {:?}", shown()))?;
            if line.iter().all(|&b| is_wsp(b)) {
                return Err("a whitespace-only continuation line".into());
            }
            f.value.extend_from_slice(line);
        } else {
            let colon = line.iter().position(|&b| b == b':').ok_or_else(|| format!("not a field: {:?}", shown()))?;
            let name = &line[..colon];
            if name.is_empty() || !name.iter().all(|&b| matches!(b, 33..=57 | 59..=126)) {
                return Err(format!("not a field name: {:?}", shown()));
            }
            fields.push(Field { name: String::from_utf8_lossy(name).into_owned(), value: line[colon + 1..].to_vec() });
        }
        i += n + 2;
    }
    Ok((fields, i))
}

/// What must follow the output's header section: the device's empty line and body, the
/// empty line and the device's first body line onwards, or nothing.
fn device_rest(input: &[u8]) -> Vec<u8> {
    let mut i = 0;
    let mut in_field = false;
    let body_from = |at: usize| {
        let mut v = b"\r\n".to_vec();
        v.extend_from_slice(&input[at..]);
        v
    };
    while i < input.len() {
        let Some(n) = crlf(&input[i..]) else {
            return body_from(i);
        };
        let line = &input[i..i + n];
        if line.is_empty() {
            return input[i..].to_vec();
        }
        let clean = !line.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n');
        // The colon within the first 998 characters (RFC 5322 2.1.1).
        let field = line.iter().position(|&b| b == b':').filter(|&c| c < 998).is_some_and(|c| {
            let mut name = &line[..c];
            while name.last().is_some_and(|&b| is_wsp(b)) {
                name = &name[..name.len() - 1];
            }
            !name.is_empty() && name.iter().all(|&b| matches!(b, 33..=57 | 59..=126))
        });
        let continuation = in_field && is_wsp(line[0]);
        if !clean || !(field || continuation) {
            return body_from(i);
        }
        in_field = true;
        i += n + 2;
    }
    Vec::new()
}

/// RFC 5322 3.2.4: `"` (qtext / quoted-pair / space)* `"`.
fn quoted_string(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return false;
    };
    let mut bytes = inner.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'\\' => {
                if !bytes.next().is_some_and(|n| n.is_ascii_graphic() || n == b' ') {
                    return false;
                }
            }
            b'"' => return false,
            b' ' => {}
            b if b.is_ascii_graphic() => {}
            _ => return false,
        }
    }
    true
}

/// RFC 2047: encoded-words of at most 75 characters, separated by spaces (unfolded).
fn encoded_words(s: &str) -> bool {
    !s.is_empty()
        && s.split(' ').all(|w| {
            w.len() <= 75
                && w.strip_prefix("=?UTF-8?B?").and_then(|w| w.strip_suffix("?=")).is_some_and(|b64| {
                    !b64.is_empty() && b64.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
                })
        })
}
