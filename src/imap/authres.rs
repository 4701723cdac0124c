//! Whether the `From` of a mail was authenticated by the server that received it.
//!
//! Anyone can write any `From` (RFC 5322 3.6.2 is a claim, not a proof), so a sender
//! allow-list is only as good as the evidence that the sender is who the field says. The
//! evidence is what the receiving server (Exchange Online, Gmail) recorded when it accepted
//! the mail from outside, in `Authentication-Results` (RFC 8601):
//!
//! - `dmarc=pass` with `header.from=<domain>` (RFC 7489 11.2): the From domain is aligned
//!   with an SPF or DKIM pass;
//! - Exchange's composite authentication `compauth=pass`, for the `header.from` domain that
//!   the same field names;
//! - or the mail never came from outside: Exchange marks mail sent by a signed-in user of the
//!   tenant `X-MS-Exchange-Organization-AuthAs: Internal`.
//!
//! **Which field is trusted.** Only the topmost `Authentication-Results` field, i.e. the one
//! added last. RFC 8601 5: a consumer must only trust fields added by its own ADMD; fields
//! further down may have been written by the sender (a forger adds `dmarc=pass` for whatever
//! domain he likes). The mailbox's own server adds its field on receipt above everything the
//! mail already carried, so the topmost one is the server's. With `authserv_id` configured
//! the topmost field must also carry that authserv-id (RFC 8601 2.5), which guards against a
//! server that adds no field of its own (then the topmost would be the sender's).
//!
//! `X-MS-Exchange-Organization-*` fields are trusted only from a Microsoft provider: Exchange
//! removes them from mail arriving from outside the organisation (its "header firewall"), any
//! other server passes them through as the sender wrote them.

/// The topmost `Authentication-Results` field is taken from the mailbox's own server.
pub const AUTH_RESULTS: &str = "Authentication-Results";
/// Exchange: how the sender authenticated (`Internal`, `Anonymous`, ...).
pub const EXCHANGE_AUTH_AS: &str = "X-MS-Exchange-Organization-AuthAs";

/// What is trusted about the receiving server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// The authserv-id the topmost field must carry, if configured.
    pub authserv_id: Option<String>,
    /// Whether `X-MS-Exchange-Organization-AuthAs` is believed (a Microsoft provider).
    pub exchange_internal: bool,
}

/// One method result of an `Authentication-Results` field (RFC 8601 2.2 `resinfo`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResInfo {
    /// Lower case, without a version (`dmarc`, `compauth`).
    pub method: String,
    /// Lower case (`pass`, `fail`, `none`...).
    pub result: String,
    /// `ptype.property` (lower case) and value, e.g. (`header.from`, `contoso.com`).
    pub props: Vec<(String, String)>,
}

/// A parsed `Authentication-Results` field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthResults {
    pub authserv_id: String,
    pub results: Vec<ResInfo>,
}

/// Removes comments (RFC 5322 3.2.2, nested), unfolds, and keeps quoted strings intact.
fn strip_comments(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let (mut depth, mut quoted, mut escaped) = (0u32, false, false);
    for c in value.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            '\\' if quoted || depth > 0 => {
                escaped = true;
                if depth == 0 {
                    out.push(c);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => {
                depth -= 1;
                out.push(' ');
            }
            '\r' | '\n' => out.push(' '),
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// A lexical token of an `Authentication-Results` value (after comments are gone).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// An atom, a dot-atom or a quoted string's content (one token, even with spaces or `;`).
    Word(String),
    Equals,
    Semicolon,
}

fn tokens(s: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = s.chars();
    let end_word = |word: &mut Option<String>, out: &mut Vec<Token>| {
        if let Some(w) = word.take() {
            out.push(Token::Word(w));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let w = word.get_or_insert_with(String::new);
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => w.extend(chars.next()),
                        q => w.push(q),
                    }
                }
            }
            ';' => {
                end_word(&mut word, &mut out);
                out.push(Token::Semicolon);
            }
            '=' => {
                end_word(&mut word, &mut out);
                out.push(Token::Equals);
            }
            c if c.is_whitespace() => end_word(&mut word, &mut out),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    end_word(&mut word, &mut out);
    out
}

/// Parses an `Authentication-Results` value (RFC 8601 2.2). Lenient: what cannot be read is
/// left out, which can only make a sender less trusted.
pub fn parse(value: &str) -> AuthResults {
    let toks = tokens(&strip_comments(value));
    let mut sections = toks.split(|t| *t == Token::Semicolon);
    // authserv-id [ CFWS authres-version ]
    let authserv_id = match sections.next().and_then(|s| s.first()) {
        Some(Token::Word(w)) => w.to_ascii_lowercase(),
        _ => String::new(),
    };
    let mut results = Vec::new();
    for section in sections {
        // key "=" value triples; the first is "method[/version]=result".
        let mut pairs = Vec::new();
        let mut i = 0;
        while i < section.len() {
            match (&section[i], section.get(i + 1), section.get(i + 2)) {
                (Token::Word(k), Some(Token::Equals), Some(Token::Word(v))) => {
                    pairs.push((k.to_ascii_lowercase(), v.clone()));
                    i += 3;
                }
                _ => i += 1,
            }
        }
        let mut pairs = pairs.into_iter();
        let Some((method, result)) = pairs.next() else { continue };
        let method = method.split('/').next().unwrap_or("").to_string();
        let props = pairs.filter(|(k, _)| k.contains('.')).collect();
        results.push(ResInfo { method, result: result.to_ascii_lowercase(), props });
    }
    AuthResults { authserv_id, results }
}

/// The domain of an address or a bare domain, lower case, without a trailing dot.
fn domain_of(s: &str) -> String {
    let s = s.trim().trim_matches(['<', '>']);
    s.rsplit_once('@').map(|(_, d)| d).unwrap_or(s).trim_end_matches('.').to_ascii_lowercase()
}

impl AuthResults {
    fn header_from(&self) -> impl Iterator<Item = String> + '_ {
        self.results.iter().flat_map(|r| r.props.iter()).filter(|(k, _)| k == "header.from").map(|(_, v)| domain_of(v))
    }

    /// Whether this field says the From domain `domain` passed DMARC, or Exchange's
    /// composite authentication for it.
    pub fn vouches_for(&self, domain: &str) -> bool {
        let domain = domain_of(domain);
        let dmarc = self.results.iter().any(|r| {
            r.method == "dmarc"
                && r.result == "pass"
                && r.props.iter().any(|(k, v)| k == "header.from" && domain_of(v) == domain)
        });
        // compauth names no domain itself; Exchange puts header.from on the dmarc result of
        // the same field.
        let compauth = self.results.iter().any(|r| r.method == "compauth" && r.result == "pass")
            && self.header_from().any(|d| d == domain);
        dmarc || compauth
    }
}

/// Whether every address of `from` was authenticated, judged by the header `fields` (name,
/// unfolded raw value) in the order they appear in the mail, topmost first.
pub fn from_authenticated(fields: &[(&str, &str)], from: &[String], trust: &Trust) -> bool {
    if from.is_empty() {
        return false;
    }
    if trust.exchange_internal {
        let internal = fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(EXCHANGE_AUTH_AS))
            .is_some_and(|(_, v)| v.trim().eq_ignore_ascii_case("internal"));
        if internal {
            return true;
        }
    }
    // Only the topmost field (see the module docs); never a later one.
    let Some((_, top)) = fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(AUTH_RESULTS)) else { return false };
    let top = parse(top);
    if let Some(id) = &trust.authserv_id {
        if !top.authserv_id.eq_ignore_ascii_case(id.trim()) {
            return false;
        }
    }
    from.iter().all(|a| a.contains('@') && top.vouches_for(&domain_of(a)))
}

/// The header fields of a parsed mail as (name, raw value), in order.
pub fn fields<'a>(msg: &'a mail_parser::Message<'_>) -> Vec<(&'a str, &'a str)> {
    let raw: &[u8] = &msg.raw_message;
    msg.headers()
        .iter()
        .map(|h| {
            let value = raw
                .get(h.offset_start as usize..h.offset_end as usize)
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or("");
            (h.name.as_str(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXO: &str = "spf=pass (sender IP is 40.107.1.1) smtp.mailfrom=contoso.com; dkim=pass (signature was verified)\r\n header.d=contoso.com;dmarc=pass action=none header.from=contoso.com;compauth=pass reason=100";

    fn trust() -> Trust {
        Trust::default()
    }

    fn from(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_rfc_8601_examples_and_exchange_fields() {
        let r = parse("example.com; spf=pass smtp.mailfrom=example.net");
        assert_eq!(r.authserv_id, "example.com");
        assert_eq!(r.results[0].method, "spf");
        assert_eq!(r.results[0].result, "pass");
        assert_eq!(r.results[0].props, [("smtp.mailfrom".to_string(), "example.net".to_string())]);
        // RFC 8601 B.4-like: version, comments, white space around "=".
        let r = parse("mail-router.example.net 1; dkim = pass (good signature) header.d=newyork.example.com\r\n\t(comment; with semicolon) header.b=\"oINEO8hg\";\r\n dkim/1=fail reason=\"bad; sig\" header.d=x");
        assert_eq!(r.authserv_id, "mail-router.example.net");
        assert_eq!(r.results.len(), 2, "{r:?}");
        assert_eq!((r.results[0].method.as_str(), r.results[0].result.as_str()), ("dkim", "pass"));
        assert_eq!(r.results[1].method, "dkim");
        assert_eq!(r.results[1].result, "fail");
        assert!(parse("example.org; none").results.is_empty());
        let r = parse(&format!("BN8NAM12FT047.mail.protection.outlook.com; {EXO}"));
        assert!(r.vouches_for("contoso.com"));
        assert!(r.vouches_for("CONTOSO.COM."));
        assert!(!r.vouches_for("fabrikam.com"));
    }

    #[test]
    fn dmarc_or_compauth_pass_for_the_from_domain() {
        let f = |ar: &str, who: &[&str]| from_authenticated(&[(AUTH_RESULTS, ar)], &from(who), &trust());
        assert!(f("mx.google.com; dmarc=pass (p=REJECT) header.from=contoso.com", &["alice@contoso.com"]));
        assert!(f("mx; dmarc=pass header.from=alice@Contoso.com", &["Alice@contoso.COM"]));
        assert!(!f("mx; dmarc=pass header.from=contoso.com", &["eve@evil.test"]));
        assert!(!f("mx; dmarc=fail header.from=contoso.com", &["alice@contoso.com"]));
        assert!(!f("mx; dmarc=none header.from=contoso.com", &["alice@contoso.com"]));
        assert!(!f("mx; spf=pass smtp.mailfrom=contoso.com; dkim=pass header.d=contoso.com", &["alice@contoso.com"]));
        // compauth for the header.from of the same field (Exchange: dmarc none, compauth pass).
        assert!(f(
            "outlook.com; dmarc=none action=none header.from=contoso.com;compauth=pass reason=105",
            &["alice@contoso.com"]
        ));
        assert!(!f("outlook.com; compauth=pass reason=105", &["alice@contoso.com"]));
        assert!(!f("outlook.com; dmarc=none header.from=contoso.com; compauth=fail reason=001", &["a@contoso.com"]));
        // Every From address must be covered.
        assert!(!f("mx; dmarc=pass header.from=contoso.com", &["alice@contoso.com", "eve@evil.test"]));
        assert!(!f("mx; dmarc=pass header.from=contoso.com", &[]));
        // The pass must not hide in a comment or a quoted reason.
        assert!(!f("mx; dmarc=fail (dmarc=pass header.from=contoso.com) header.from=contoso.com", &["a@contoso.com"]));
        assert!(!f("mx; dmarc=fail reason=\"dmarc=pass header.from=contoso.com\"", &["a@contoso.com"]));
    }

    #[test]
    fn only_the_topmost_field_counts() {
        let from = from(&["alice@contoso.com"]);
        // The receiving server's verdict on top, the sender's forgery below it.
        let forged = [
            (AUTH_RESULTS, "mx.contoso.com; dmarc=fail header.from=contoso.com"),
            ("Received", "from evil"),
            (AUTH_RESULTS, "mx.contoso.com; dmarc=pass header.from=contoso.com"),
        ];
        assert!(!from_authenticated(&forged, &from, &trust()));
        let genuine = [(AUTH_RESULTS, "mx.contoso.com; dmarc=pass header.from=contoso.com"), (AUTH_RESULTS, "x; none")];
        assert!(from_authenticated(&genuine, &from, &trust()));
        assert!(!from_authenticated(&[("Received", "x")], &from, &trust()));
        // With authserv_id, the topmost field must be the server's own.
        let pinned = Trust { authserv_id: Some("mx.contoso.com".into()), ..trust() };
        assert!(from_authenticated(&genuine, &from, &pinned));
        let other = [(AUTH_RESULTS, "evil.test; dmarc=pass header.from=contoso.com")];
        assert!(from_authenticated(&other, &from, &trust()));
        assert!(!from_authenticated(&other, &from, &pinned));
    }

    #[test]
    fn exchange_internal_mail_only_from_a_microsoft_provider() {
        let fields = [(EXCHANGE_AUTH_AS, " Internal"), ("Subject", "x")];
        let who = from(&["bob@anything.test"]);
        assert!(!from_authenticated(&fields, &who, &trust()), "any other server passes the header through");
        let exchange = Trust { exchange_internal: true, ..trust() };
        assert!(from_authenticated(&fields, &who, &exchange));
        assert!(!from_authenticated(&[(EXCHANGE_AUTH_AS, "Anonymous")], &who, &exchange));
    }

    #[test]
    fn fields_of_a_parsed_mail_keep_order_and_raw_values() {
        let raw = b"Authentication-Results: mx.top; dmarc=pass\r\n header.from=contoso.com\r\nFrom: a@contoso.com\r\nAuthentication-Results: forged; dmarc=pass header.from=x\r\n\r\nbody";
        let msg = mail_parser::MessageParser::default().parse(&raw[..]).unwrap();
        let f = fields(&msg);
        let ar: Vec<&str> = f.iter().filter(|(n, _)| n.eq_ignore_ascii_case(AUTH_RESULTS)).map(|(_, v)| *v).collect();
        assert_eq!(ar.len(), 2);
        assert!(ar[0].contains("mx.top") && ar[0].contains("header.from=contoso.com"), "{ar:?}");
        assert!(from_authenticated(&f, &from(&["a@contoso.com"]), &trust()));
    }
}
