//! The recipients of a message sent through an HTTP mail API.
//!
//! SMTP sends to the envelope (RFC 5321 3.3: RCPT TO), whatever the header says. Microsoft
//! Graph and the Gmail API have no envelope: they send to the addresses in To, Cc and Bcc.
//! Devices often send one transaction per recipient with every address in To; sent as it
//! is, each recipient would get the message once per transaction. So before a message goes
//! to such an API its header names exactly the envelope's recipients:
//! - To keeps the To addresses that are in the envelope, Cc likewise;
//! - every other envelope recipient goes in Bcc (both APIs remove Bcc before delivery);
//! - a field whose addresses stay the same is left byte for byte (a group such as
//!   `undisclosed-recipients:;` included), and a header that already names exactly the
//!   envelope is not touched at all.
//!
//! The rewrite is a pure function of the header and the envelope, so a resumed upload sends
//! the same bytes as the attempt it continues.

use std::collections::HashSet;

use mail_parser::{Address, HeaderValue, MessageParser};

use super::{fields, mailbox, Field};

/// Who the API will send to, by field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    /// The header named a recipient outside the envelope (in To, Cc, Bcc or Resent-*), or a
    /// field we could not read whole: the header was cut to the envelope, and an API that
    /// reads recipients from the MIME must be told the lists explicitly (Graph's draft path).
    pub dropped: bool,
}

/// (display name, address) of each mailbox in a To/Cc/Bcc field (groups flattened).
fn mailboxes(f: &Field<'_>) -> Vec<(Option<String>, String)> {
    let mut probe = b"To:".to_vec();
    probe.extend_from_slice(f.value);
    for m in &f.more {
        probe.extend_from_slice(b"\r\n");
        probe.extend_from_slice(m);
    }
    probe.extend_from_slice(b"\r\n\r\n");
    let Some(parsed) = MessageParser::default().parse_headers(&probe) else { return Vec::new() };
    let Some(header) = parsed.headers().first() else { return Vec::new() };
    let list: Vec<&mail_parser::Addr<'_>> = match &header.value {
        HeaderValue::Address(Address::List(list)) => list.iter().collect(),
        HeaderValue::Address(Address::Group(groups)) => groups.iter().flat_map(|g| g.addresses.iter()).collect(),
        _ => Vec::new(),
    };
    list.into_iter()
        .filter_map(|a| {
            let address = a.address.as_deref()?.trim().to_string();
            address.contains('@').then(|| (a.name.as_deref().and_then(super::clean_display_name), address))
        })
        .collect()
}

/// How many `@` a field's text holds: at least as many as the addresses in it.
fn at_signs(f: &Field<'_>) -> usize {
    let count = |b: &[u8]| b.iter().filter(|&&c| c == b'@').count();
    count(f.value) + f.more.iter().map(|m| count(m)).sum::<usize>()
}

/// Addresses compare without regard to case: providers treat them so, and devices differ.
fn key(a: &str) -> String {
    a.to_ascii_lowercase()
}

/// The mailboxes of every field named `name`, in order.
fn field_mailboxes(all: &[Field<'_>], name: &str) -> Vec<(Option<String>, String)> {
    all.iter().filter(|f| f.is(name)).flat_map(mailboxes).collect()
}

/// `list` without duplicates, keeping the first of each address.
fn dedup(list: Vec<(Option<String>, String)>) -> Vec<(Option<String>, String)> {
    let mut seen = HashSet::new();
    list.into_iter().filter(|(_, a)| seen.insert(key(a))).collect()
}

/// Whether two lists name the same addresses in the same order.
fn same(a: &[(Option<String>, String)], b: &[(Option<String>, String)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| key(&x.1) == key(&y.1))
}

/// One field with the given mailboxes, folded one mailbox per line.
fn render(name: &str, list: &[(Option<String>, String)]) -> Vec<u8> {
    let parts: Vec<String> = list.iter().map(|(n, a)| mailbox(n.as_deref(), a)).collect();
    format!("{name}: {}\r\n", parts.join(",\r\n ")).into_bytes()
}

/// The plan for `header` (a spooled message's header section: complete CRLF lines, without
/// the empty line) and `envelope`, and the new header section when it must change.
pub fn for_envelope(header: &[u8], envelope: &[String]) -> (Plan, Option<Vec<u8>>) {
    let all = fields(header);
    let in_envelope: HashSet<String> = envelope.iter().map(|a| key(a)).collect();
    let old_to = field_mailboxes(&all, "To");
    let old_cc = field_mailboxes(&all, "Cc");
    let old_bcc = field_mailboxes(&all, "Bcc");
    let to = dedup(old_to.iter().filter(|(_, a)| in_envelope.contains(&key(a))).cloned().collect());
    let in_to: HashSet<String> = to.iter().map(|(_, a)| key(a)).collect();
    let cc = dedup(
        old_cc.iter().filter(|(_, a)| in_envelope.contains(&key(a)) && !in_to.contains(&key(a))).cloned().collect(),
    );
    let shown: HashSet<String> = to.iter().chain(&cc).map(|(_, a)| key(a)).collect();
    let bcc = dedup(envelope.iter().filter(|a| !shown.contains(&key(a))).map(|a| (None, a.clone())).collect());
    let resent = |f: &Field<'_>| f.is("Resent-To") || f.is("Resent-Cc") || f.is("Resent-Bcc");
    let named = |f: &&Field<'_>| f.is("To") || f.is("Cc") || f.is("Bcc") || resent(f);
    let dropped = all.iter().filter(named).any(|f| {
        let list = mailboxes(f);
        at_signs(f) > list.len() || list.iter().any(|(_, a)| !in_envelope.contains(&key(a)))
    });
    let plan = Plan {
        to: to.iter().map(|(_, a)| a.clone()).collect(),
        cc: cc.iter().map(|(_, a)| a.clone()).collect(),
        bcc: bcc.iter().map(|(_, a)| a.clone()).collect(),
        dropped,
    };
    let keep = |name: &str, old: &[(Option<String>, String)], new: &[(Option<String>, String)]| {
        // A field is kept as it is when its addresses stay and it holds nothing we could not
        // read (an API's parser might find an address in it that ours did not); an absent
        // field stays absent.
        let fields: Vec<&Field<'_>> = all.iter().filter(|f| f.is(name)).collect();
        let clear = fields.iter().all(|f| at_signs(f) <= mailboxes(f).len());
        same(old, new) && clear && (!fields.is_empty() || new.is_empty())
    };
    let (keep_to, keep_cc, keep_bcc) =
        (keep("To", &old_to, &to), keep("Cc", &old_cc, &cc), keep("Bcc", &old_bcc, &bcc));
    // Resent-To/Cc/Bcc name recipients of an earlier sending; an API might send to them too.
    if keep_to && keep_cc && keep_bcc && !all.iter().any(resent) {
        return (plan, None);
    }
    let mut out = Vec::with_capacity(header.len() + 64 * envelope.len());
    let mut placed = false;
    let new_fields = |out: &mut Vec<u8>| {
        for (name, keep, list) in [("To", keep_to, &to), ("Cc", keep_cc, &cc), ("Bcc", keep_bcc, &bcc)] {
            if !keep && !list.is_empty() {
                out.extend_from_slice(&render(name, list));
            }
        }
    };
    for f in &all {
        if resent(f) {
            continue;
        }
        let replaced = (f.is("To") && !keep_to) || (f.is("Cc") && !keep_cc) || (f.is("Bcc") && !keep_bcc);
        if replaced {
            // The new fields go where the first replaced one was.
            if !placed {
                new_fields(&mut out);
                placed = true;
            }
            continue;
        }
        // Spooled fields are already valid (lines within 998 characters): written as they are.
        let _ = f.write(&mut out);
    }
    if !placed {
        new_fields(&mut out);
    }
    (plan, Some(out))
}

/// Where a spooled message's header section ends: the length of its complete lines (the
/// empty line that follows is not counted), or `None` when `start` holds no empty line.
pub fn header_len(start: &[u8]) -> Option<usize> {
    if start.starts_with(b"\r\n") {
        return Some(0);
    }
    start.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn header_of(new: &[u8]) -> String {
        String::from_utf8(new.to_vec()).expect("ascii")
    }

    #[test]
    fn a_header_that_names_the_envelope_is_not_touched() {
        let h = b"From: scans@contoso.com\r\nTo: Boss <boss@contoso.com>\r\nCc: team@contoso.com\r\nSubject: s\r\n";
        let (plan, new) = for_envelope(h, &env(&["boss@contoso.com", "TEAM@contoso.com"]));
        assert_eq!(new, None);
        assert!(!plan.dropped);
        assert_eq!(plan.to, ["boss@contoso.com"]);
        assert_eq!(plan.cc, ["team@contoso.com"]);
        assert!(plan.bcc.is_empty());
    }

    #[test]
    fn one_transaction_per_recipient_names_only_that_recipient() {
        // A device sent three transactions, each with every address in To.
        let h = b"From: scans@contoso.com\r\nTo: a@x.test, \"B. B.\" <b@x.test>,\r\n c@x.test\r\nSubject: scan\r\n";
        let (plan, new) = for_envelope(h, &env(&["b@x.test"]));
        let new = header_of(&new.expect("rewritten"));
        assert_eq!(plan, Plan { to: vec!["b@x.test".into()], cc: vec![], bcc: vec![], dropped: true });
        assert_eq!(new, "From: scans@contoso.com\r\nTo: \"B. B.\" <b@x.test>\r\nSubject: scan\r\n");
    }

    #[test]
    fn envelope_only_recipients_go_in_bcc_and_the_rest_stays_byte_for_byte() {
        let h = b"From: scans@contoso.com\r\nTo: a@x.test\r\nSubject: =?UTF-8?B?w6k=?=\r\n";
        let (plan, new) = for_envelope(h, &env(&["a@x.test", "archive@x.test"]));
        assert_eq!(plan.bcc, ["archive@x.test"]);
        assert!(!plan.dropped, "an added Bcc drops nobody");
        assert_eq!(
            header_of(&new.expect("rewritten")),
            "From: scans@contoso.com\r\nTo: a@x.test\r\nSubject: =?UTF-8?B?w6k=?=\r\nBcc: archive@x.test\r\n"
        );
    }

    #[test]
    fn addresses_outside_the_envelope_leave_cc_and_bcc() {
        let h = b"To: a@x.test\r\nCc: b@x.test, c@x.test\r\nBcc: d@x.test\r\nSubject: s\r\n";
        let (plan, new) = for_envelope(h, &env(&["c@x.test"]));
        assert_eq!(plan, Plan { to: vec![], cc: vec!["c@x.test".into()], bcc: vec![], dropped: true });
        assert_eq!(header_of(&new.expect("rewritten")), "Cc: c@x.test\r\nSubject: s\r\n");
    }

    #[test]
    fn a_group_with_no_members_is_kept_and_the_envelope_goes_in_bcc() {
        let h = b"To: undisclosed-recipients:;\r\nSubject: s\r\n";
        let (plan, new) = for_envelope(h, &env(&["a@x.test"]));
        assert_eq!(plan.bcc, ["a@x.test"]);
        assert_eq!(
            header_of(&new.expect("rewritten")),
            "To: undisclosed-recipients:;\r\nSubject: s\r\nBcc: a@x.test\r\n"
        );
    }

    #[test]
    fn duplicates_and_case_do_not_make_two_recipients() {
        let h = b"To: a@x.test, A@X.TEST\r\nCc: a@x.test\r\n";
        let (plan, _) = for_envelope(h, &env(&["a@x.test", "a@X.test"]));
        assert_eq!(plan, Plan { to: vec!["a@x.test".into()], cc: vec![], bcc: vec![], dropped: false });
    }

    #[test]
    fn non_ascii_display_names_are_encoded_again() {
        let h = "To: =?UTF-8?B?w4lsaXNl?= <e@x.test>, f@x.test\r\n".as_bytes();
        let (_, new) = for_envelope(h, &env(&["e@x.test"]));
        assert_eq!(header_of(&new.expect("rewritten")), "To: =?UTF-8?B?w4lsaXNl?= <e@x.test>\r\n");
    }

    #[test]
    fn a_field_we_cannot_read_whole_is_rewritten_not_kept() {
        // mail-parser reads only a@x.test from each of these; a laxer parser upstream might
        // find b@y.test too, a recipient outside the envelope.
        for to in ["a@x.test, \"b@y.test", "a@x.test, (b@y.test", "a@x.test, =?utf-8?q?b@y.test?="] {
            let h = format!("To: {to}\r\nSubject: s\r\n");
            let (plan, new) = for_envelope(h.as_bytes(), &env(&["a@x.test"]));
            assert_eq!(plan.to, ["a@x.test"], "{to}");
            assert!(plan.dropped, "{to}");
            assert_eq!(header_of(&new.expect("rewritten")), "To: a@x.test\r\nSubject: s\r\n", "{to}");
        }
    }

    #[test]
    fn resent_recipients_do_not_go_to_an_api() {
        let h = b"To: a@x.test\r\nResent-To: old@y.test\r\nResent-Bcc: older@y.test\r\nSubject: s\r\n";
        let (plan, new) = for_envelope(h, &env(&["a@x.test"]));
        assert_eq!(header_of(&new.expect("rewritten")), "To: a@x.test\r\nSubject: s\r\n");
        assert!(plan.dropped);
    }

    #[test]
    fn the_header_ends_at_the_first_empty_line() {
        assert_eq!(header_len(b"To: a@x.test\r\n\r\nbody\r\n\r\n"), Some(14));
        assert_eq!(header_len(b"\r\nbody"), Some(0));
        assert_eq!(header_len(b"To: a@x.test\r\n"), None);
    }
}
