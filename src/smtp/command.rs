//! Parsing of SMTP command lines into typed commands (RFC 5321 4.1). Pure: no I/O, no state.
//!
//! Strict where it protects the relay, lenient where old devices are known to deviate:
//! lower-case verbs, `MAIL FROM: <x>` with a space, `MAIL FROM:x` without brackets, trailing
//! white space. The session decides what a command means in its current state.

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// `from == None` is the null reverse-path `<>`.
    Mail {
        from: Option<String>,
        size: Option<u64>,
        eight_bit: bool,
    },
    Rcpt {
        to: String,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    Starttls,
    /// RFC 4954: `AUTH mechanism [initial-response]`; `=` is an empty initial response.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
}

/// Why a line is not a valid command; each maps to one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// 500 5.5.1
    Unknown,
    /// 501 5.5.4 with the reason.
    Syntax(&'static str),
    /// 555 5.5.4: a MAIL/RCPT parameter we did not advertise.
    UnsupportedParam(String),
    /// 502 5.5.1: a known command we do not implement (EXPN, TURN, BDAT...).
    NotImplemented(&'static str),
}

/// RFC 5321 4.5.3.1: local part 64, domain 255, path 256 octets.
pub const MAX_LOCAL_PART: usize = 64;
pub const MAX_DOMAIN: usize = 255;
pub const MAX_PATH: usize = 256;

/// Parses one command line, without its line ending.
pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
    let line = std::str::from_utf8(line).map_err(|_| ParseError::Syntax("Invalid characters in command"))?;
    let line = line.trim_end_matches([' ', '\t']);
    let (verb, rest) = match line.find([' ', '\t']) {
        Some(i) => (&line[..i], line[i + 1..].trim_start()),
        None => (line, ""),
    };
    let upper = verb.to_ascii_uppercase();
    match upper.as_str() {
        "EHLO" | "HELO" => {
            let name = rest.split_whitespace().next().unwrap_or("");
            if name.is_empty() {
                return Err(ParseError::Syntax("EHLO/HELO needs a domain name"));
            }
            if name.len() > MAX_DOMAIN + 2 || name.chars().any(|c| c.is_control()) {
                return Err(ParseError::Syntax("Invalid domain name"));
            }
            Ok(if upper == "EHLO" { Command::Ehlo(name.to_string()) } else { Command::Helo(name.to_string()) })
        }
        "MAIL" => parse_mail(rest),
        "RCPT" => parse_rcpt(rest),
        "DATA" => no_args(rest, Command::Data),
        "RSET" => no_args(rest, Command::Rset),
        // RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored.
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(rest, Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        "STARTTLS" => no_args(rest, Command::Starttls),
        "AUTH" => parse_auth(rest),
        "BDAT" => Err(ParseError::NotImplemented("BDAT not supported; use DATA")),
        "TURN" | "ETRN" | "ATRN" => Err(ParseError::NotImplemented("Command not implemented")),
        _ => Err(ParseError::Unknown),
    }
}

fn no_args(rest: &str, cmd: Command) -> Result<Command, ParseError> {
    if rest.is_empty() {
        Ok(cmd)
    } else {
        Err(ParseError::Syntax("This command takes no arguments"))
    }
}

/// Strips a case-insensitive keyword like `FROM:` and any spaces after it.
fn keyword<'a>(rest: &'a str, kw: &str) -> Option<&'a str> {
    if rest.len() >= kw.len() && rest.is_char_boundary(kw.len()) && rest[..kw.len()].eq_ignore_ascii_case(kw) {
        Some(rest[kw.len()..].trim_start())
    } else {
        None
    }
}

fn parse_mail(rest: &str) -> Result<Command, ParseError> {
    let rest = keyword(rest, "FROM:").ok_or(ParseError::Syntax("Syntax: MAIL FROM:<address>"))?;
    let (path, params) = split_path(rest)?;
    let from = if path.is_empty() { None } else { Some(check_address(path)?) };
    let mut size = None;
    let mut eight_bit = false;
    for p in params.split_whitespace() {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        match k.to_ascii_uppercase().as_str() {
            // RFC 1870
            "SIZE" => size = Some(v.parse::<u64>().map_err(|_| ParseError::Syntax("SIZE needs a number"))?),
            // RFC 6152
            "BODY" => match v.to_ascii_uppercase().as_str() {
                "7BIT" => eight_bit = false,
                "8BITMIME" => eight_bit = true,
                _ => return Err(ParseError::UnsupportedParam(format!("BODY={v} not supported"))),
            },
            // RFC 4954 5: accepted and ignored (we are the submission server, not a trusted relay).
            "AUTH" => {}
            _ => return Err(ParseError::UnsupportedParam(format!("{k} parameter not supported"))),
        }
    }
    Ok(Command::Mail { from, size, eight_bit })
}

fn parse_rcpt(rest: &str) -> Result<Command, ParseError> {
    let rest = keyword(rest, "TO:").ok_or(ParseError::Syntax("Syntax: RCPT TO:<address>"))?;
    let (path, params) = split_path(rest)?;
    if path.is_empty() {
        return Err(ParseError::Syntax("Recipient address required"));
    }
    if let Some(p) = params.split_whitespace().next() {
        return Err(ParseError::UnsupportedParam(format!(
            "{} parameter not supported",
            p.split('=').next().unwrap_or(p)
        )));
    }
    // RFC 5321 4.1.1.3: "Postmaster" without a domain must be accepted; we have no local
    // mailboxes, so it is refused later as not allowed rather than as bad syntax.
    Ok(Command::Rcpt { to: check_address(path)? })
}

fn parse_auth(rest: &str) -> Result<Command, ParseError> {
    let mut words = rest.split_whitespace();
    let mechanism =
        words.next().ok_or(ParseError::Syntax("Syntax: AUTH mechanism [initial-response]"))?.to_ascii_uppercase();
    let initial = words.next().map(|s| s.to_string());
    if words.next().is_some() {
        return Err(ParseError::Syntax("Syntax: AUTH mechanism [initial-response]"));
    }
    Ok(Command::Auth { mechanism, initial })
}

/// Splits `<path> params` (or a bare `path params`, as old devices send) into the path
/// without brackets and the parameter text.
fn split_path(rest: &str) -> Result<(&str, &str), ParseError> {
    if let Some(inner) = rest.strip_prefix('<') {
        // Find the closing bracket, skipping quoted local parts ("a>b"@x).
        let mut in_quotes = false;
        let mut escaped = false;
        for (i, c) in inner.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                '>' if !in_quotes => {
                    let path = strip_source_route(&inner[..i]);
                    return Ok((path, inner[i + 1..].trim_start()));
                }
                _ => {}
            }
        }
        Err(ParseError::Syntax("Missing closing '>'"))
    } else {
        let end = rest.find([' ', '\t']).unwrap_or(rest.len());
        if rest.is_empty() {
            return Err(ParseError::Syntax("Address required"));
        }
        Ok((&rest[..end], rest[end..].trim_start()))
    }
}

/// RFC 5321 4.1.2 / Appendix C: source routes `@a,@b:user@c` are accepted and ignored.
fn strip_source_route(path: &str) -> &str {
    if path.starts_with('@') {
        if let Some(i) = path.find(':') {
            return &path[i + 1..];
        }
    }
    path
}

/// Checks the mailbox syntax of RFC 5321 4.1.2 loosely enough for real devices:
/// a local part (dot-string or quoted string), `@`, a domain or an address literal.
fn check_address(addr: &str) -> Result<String, ParseError> {
    if addr.len() > MAX_PATH {
        return Err(ParseError::Syntax("Address too long"));
    }
    let (local, domain) = addr.rsplit_once('@').ok_or(ParseError::Syntax("Address must be user@domain"))?;
    if local.is_empty() || local.len() > MAX_LOCAL_PART {
        return Err(ParseError::Syntax("Invalid local part"));
    }
    if !addr.is_ascii() {
        return Err(ParseError::Syntax("Non-ASCII addresses need SMTPUTF8, which is not offered"));
    }
    let quoted = local.len() >= 2 && local.starts_with('"') && local.ends_with('"');
    // RFC 5321 4.1.2: qtextSMTP and quoted-pairSMTP are printable ASCII and space only.
    if quoted && !local.bytes().all(|b| (32..=126).contains(&b)) {
        return Err(ParseError::Syntax("Invalid local part"));
    }
    if !quoted && !local.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b)) {
        return Err(ParseError::Syntax("Invalid local part"));
    }
    if domain.is_empty() || domain.len() > MAX_DOMAIN {
        return Err(ParseError::Syntax("Invalid domain"));
    }
    let literal = domain.starts_with('[') && domain.ends_with(']');
    // RFC 5321 4.1.3: an address literal is printable ASCII without brackets or backslash.
    if literal
        && (domain.len() < 3
            || !domain[1..domain.len() - 1].bytes().all(|b| (33..=126).contains(&b) && !b"[]\\".contains(&b)))
    {
        return Err(ParseError::Syntax("Invalid address literal"));
    }
    if !literal
        && !domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
    {
        return Err(ParseError::Syntax("Invalid domain"));
    }
    Ok(addr.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, ParseError> {
        parse(s.as_bytes())
    }

    fn mail(from: Option<&str>) -> Command {
        Command::Mail { from: from.map(String::from), size: None, eight_bit: false }
    }

    #[test]
    fn hello_commands() {
        assert_eq!(p("EHLO printer.lan"), Ok(Command::Ehlo("printer.lan".into())));
        assert_eq!(p("ehlo [192.168.1.5]"), Ok(Command::Ehlo("[192.168.1.5]".into())));
        assert_eq!(p("HELO canon"), Ok(Command::Helo("canon".into())));
        assert!(matches!(p("EHLO"), Err(ParseError::Syntax(_))));
    }

    #[test]
    fn mail_from_variants_old_devices_send() {
        assert_eq!(p("MAIL FROM:<a@b.c>"), Ok(mail(Some("a@b.c"))));
        assert_eq!(p("mail from: <a@b.c>"), Ok(mail(Some("a@b.c"))));
        assert_eq!(p("MAIL FROM:a@b.c"), Ok(mail(Some("a@b.c"))));
        assert_eq!(p("MAIL FROM:<>"), Ok(mail(None)));
        assert_eq!(p("MAIL FROM:<@relay.x,@y:a@b.c>"), Ok(mail(Some("a@b.c"))));
        assert_eq!(p("MAIL FROM:<a@b.c>   "), Ok(mail(Some("a@b.c"))));
        assert_eq!(p("MAIL FROM:<\"odd>name\"@b.c>"), Ok(mail(Some("\"odd>name\"@b.c"))));
    }

    #[test]
    fn mail_parameters() {
        assert_eq!(
            p("MAIL FROM:<a@b.c> SIZE=1000 BODY=8BITMIME AUTH=<>"),
            Ok(Command::Mail { from: Some("a@b.c".into()), size: Some(1000), eight_bit: true })
        );
        assert!(matches!(p("MAIL FROM:<a@b.c> SIZE=lots"), Err(ParseError::Syntax(_))));
        assert!(matches!(p("MAIL FROM:<a@b.c> SMTPUTF8"), Err(ParseError::UnsupportedParam(_))));
        assert!(matches!(p("MAIL FROM:<a@b.c> BODY=BINARYMIME"), Err(ParseError::UnsupportedParam(_))));
    }

    #[test]
    fn bad_addresses() {
        for bad in [
            "MAIL FROM:<a@b.c",
            "MAIL FROM:<ab.c>",
            "MAIL FROM:<a b@c.d>",
            "MAIL FROM:<a@b..c>",
            "MAIL FROM:<a@-->",
            "MAIL TO:<a@b.c>",
            "MAIL FROM:",
            "RCPT TO:<>",
            "RCPT FROM:<a@b.c>",
        ] {
            assert!(matches!(p(bad), Err(ParseError::Syntax(_))), "{bad}: {:?}", p(bad));
        }
        // Found by fuzzing (fuzz/fuzz_targets/smtp_command.rs): control characters in an
        // address literal or a quoted local part must not reach the upstream's MAIL line.
        assert!(matches!(parse(b"MAIL\tFROM:O@[<#F\x1c\x06\rRCPT]"), Err(ParseError::Syntax(_))));
        assert!(matches!(parse(b"RCPT TO:<\"a\rb\"@c.d>"), Err(ParseError::Syntax(_))));
        assert!(matches!(parse(b"RCPT TO:<a@[]>"), Err(ParseError::Syntax(_))));
        assert_eq!(p("RCPT TO:<a@[IPv6:::1]>"), Ok(Command::Rcpt { to: "a@[IPv6:::1]".into() }));
        let long = format!("RCPT TO:<{}@b.c>", "x".repeat(65));
        assert!(matches!(p(&long), Err(ParseError::Syntax(_))));
        assert!(matches!(p("RCPT TO:<é@b.c>"), Err(ParseError::Syntax(_))));
    }

    #[test]
    fn rcpt() {
        assert_eq!(p("RCPT TO:<x@y.z>"), Ok(Command::Rcpt { to: "x@y.z".into() }));
        assert_eq!(p("rcpt to: x@[10.0.0.1]"), Ok(Command::Rcpt { to: "x@[10.0.0.1]".into() }));
        assert!(matches!(p("RCPT TO:<x@y.z> NOTIFY=NEVER"), Err(ParseError::UnsupportedParam(_))));
    }

    #[test]
    fn simple_commands() {
        assert_eq!(p("DATA"), Ok(Command::Data));
        assert_eq!(p("data"), Ok(Command::Data));
        assert_eq!(p("RSET"), Ok(Command::Rset));
        assert_eq!(p("NOOP anything"), Ok(Command::Noop));
        assert_eq!(p("QUIT"), Ok(Command::Quit));
        assert_eq!(p("VRFY bob"), Ok(Command::Vrfy));
        assert_eq!(p("STARTTLS"), Ok(Command::Starttls));
        assert!(matches!(p("DATA now"), Err(ParseError::Syntax(_))));
        assert!(matches!(p("BDAT 100 LAST"), Err(ParseError::NotImplemented(_))));
        assert_eq!(p("XYZZY"), Err(ParseError::Unknown));
        assert_eq!(p(""), Err(ParseError::Unknown));
        assert!(matches!(parse(b"\xff\xfe"), Err(ParseError::Syntax(_))));
        assert_eq!(parse(b"HELO\x00"), Err(ParseError::Unknown));
    }

    #[test]
    fn auth() {
        assert_eq!(p("AUTH PLAIN"), Ok(Command::Auth { mechanism: "PLAIN".into(), initial: None }));
        assert_eq!(
            p("auth login dXNlcg=="),
            Ok(Command::Auth { mechanism: "LOGIN".into(), initial: Some("dXNlcg==".into()) })
        );
        assert!(matches!(p("AUTH"), Err(ParseError::Syntax(_))));
        assert!(matches!(p("AUTH PLAIN a b"), Err(ParseError::Syntax(_))));
    }
}
