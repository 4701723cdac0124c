//! What a print mailbox accepts: who may print, which files, how large.
//!
//! Pure functions over a parsed mail (mail-parser) and the mailbox's configuration:
//! - **sender**: every address of the `From` field (RFC 5322 3.6.2) must match `senders`
//!   (`user@domain`, `*@domain`, `*`; an empty list admits anyone, which the poller warns
//!   about at startup);
//! - **size**: the whole mail (`RFC822.SIZE`, RFC 3501 7.4.2) up to `max_size`, checked before
//!   the body is downloaded;
//! - **types**: each attachment's type, from its `Content-Type` (RFC 2045 5), from the file
//!   name when that says only `application/octet-stream`, and from its first bytes ("magic"):
//!   a file that claims to be a PDF must start like one, and a file whose bytes say "Windows
//!   program" is refused whatever it claims. The effective type must be in `types` (`type/*`
//!   allowed; an empty list admits every type).
//!
//! A mail with one refused attachment is refused as a whole (the sender learns why and can
//! send again; printing half a mail would be a surprise). Pictures embedded in an HTML body
//! (`cid:` references, RFC 2392: signature logos) and text parts that are the body itself are
//! not attachments. A mail without attachments prints its text when `print_body` is on.

use std::fmt;

use mail_parser::{Message, MessagePart, MimeHeaders, PartType};

use super::authres::{self, Trust};
use super::filename::{self, Names};
use crate::config::{AddressPattern, Mailbox};

/// The rules of one mailbox.
#[derive(Debug, Clone)]
pub struct Policy {
    pub senders: Vec<AddressPattern>,
    /// Normalised MIME types or `type/*` patterns.
    pub types: Vec<String>,
    pub max_size: u64,
    pub print_body: bool,
    /// Believe `From` only when the receiving server vouches for it ([`super::authres`]).
    pub require_authenticated: bool,
    pub trust: Trust,
}

/// Why a mail is not printed. The text goes to the log and, with `reply_refused`, to the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NoSender,
    Sender(String),
    /// The receiving server did not vouch for the From address (no DMARC pass).
    Unauthenticated(String),
    TooLarge {
        size: u64,
        max: u64,
    },
    Type {
        name: String,
        found: String,
        allowed: Vec<String>,
    },
    Mismatch {
        name: String,
        claimed: String,
        found: Option<String>,
    },
    NothingToPrint {
        print_body: bool,
    },
    Unparseable,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoSender => write!(f, "the mail has no sender (From) address"),
            Refusal::Sender(s) => write!(f, "the sender {s} is not allowed to print here"),
            Refusal::Unauthenticated(s) => write!(
                f,
                "the sender address {s} could not be verified (the receiving server reports no DMARC pass for it)"
            ),
            Refusal::TooLarge { size, max } => {
                write!(f, "the mail is {size} bytes, larger than this printer takes ({max} bytes)")
            }
            Refusal::Type { name, found, allowed } => {
                write!(f, "the attachment \"{name}\" is {found}, which this printer does not print")?;
                if !allowed.is_empty() {
                    write!(f, " (it prints {})", allowed.join(", "))?;
                }
                Ok(())
            }
            Refusal::Mismatch { name, claimed, found: Some(found) } => {
                write!(f, "the attachment \"{name}\" claims to be {claimed}, but its content is {found}")
            }
            Refusal::Mismatch { name, claimed, found: None } => {
                write!(f, "the attachment \"{name}\" claims to be {claimed}, but its content is not")
            }
            Refusal::NothingToPrint { print_body: false } => write!(f, "the mail has no attachment to print"),
            Refusal::NothingToPrint { print_body: true } => write!(f, "the mail has neither attachments nor text"),
            Refusal::Unparseable => write!(f, "the mail could not be read (malformed MIME)"),
        }
    }
}

/// The sender of a mail: the first `From` address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sender {
    pub address: String,
    pub name: Option<String>,
}

/// One file of a job, before it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// Safe, unique name in the job folder.
    pub name: String,
    /// The name the sender gave, if any and if different.
    pub original_name: Option<String>,
    /// Effective MIME type.
    pub content_type: String,
    pub data: Vec<u8>,
    /// While planning: the mail part `data` will be taken from.
    pub part: Option<usize>,
}

/// What a mail becomes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub files: Vec<PlannedFile>,
    /// The mail's text, when it has no attachments and `print_body` is on.
    pub body: Option<String>,
    /// Parts left out on purpose (embedded pictures), for job.json.
    pub skipped: Vec<String>,
}

/// The name of the text file written for `print_body`.
pub const BODY_FILE: &str = "body.txt";

/// Lower-case type without parameters, with common aliases folded (RFC 2045 5.1: type and
/// subtype are case-insensitive).
pub fn normalise_type(t: &str) -> String {
    let t = t.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match t.as_str() {
        "image/jpg" | "image/pjpeg" => "image/jpeg".into(),
        "image/x-png" => "image/png".into(),
        "image/tif" => "image/tiff".into(),
        "application/x-pdf" | "application/acrobat" | "applications/vnd.pdf" | "text/pdf" => "application/pdf".into(),
        _ => t,
    }
}

/// (extension, type) pairs, both ways.
const EXTENSIONS: &[(&str, &str)] = &[
    ("pdf", "application/pdf"),
    ("jpg", "image/jpeg"),
    ("jpeg", "image/jpeg"),
    ("jpe", "image/jpeg"),
    ("png", "image/png"),
    ("gif", "image/gif"),
    ("tif", "image/tiff"),
    ("tiff", "image/tiff"),
    ("webp", "image/webp"),
    ("bmp", "image/bmp"),
    ("heic", "image/heic"),
    ("ps", "application/postscript"),
    ("txt", "text/plain"),
    ("zip", "application/zip"),
    ("doc", "application/msword"),
    ("docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
    ("xls", "application/vnd.ms-excel"),
    ("xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
    ("ppt", "application/vnd.ms-powerpoint"),
    ("pptx", "application/vnd.openxmlformats-officedocument.presentationml.presentation"),
    ("odt", "application/vnd.oasis.opendocument.text"),
    ("exe", "application/x-msdownload"),
];

/// The type a file name's extension suggests.
pub fn type_from_name(name: &str) -> Option<&'static str> {
    let (_, ext) = name.rsplit_once('.')?;
    EXTENSIONS.iter().find(|(e, _)| e.eq_ignore_ascii_case(ext)).map(|(_, t)| *t)
}

/// The usual extension of a type (the first one listed).
pub fn extension_for(content_type: &str) -> Option<&'static str> {
    EXTENSIONS.iter().find(|(_, t)| *t == content_type).map(|(e, _)| *e)
}

/// Whether a file's bytes carry a format's signature.
type Signature = fn(&[u8]) -> bool;

/// Types recognised by their first bytes. Sniffing looks at the start only, as file(1) does.
const MAGIC: &[(&str, Signature)] = &[
    // ISO 32000-1 7.5.2: the file begins with "%PDF-". Only leading white space is tolerated:
    // readers that search the first 1024 bytes would take a program or a PostScript file with
    // "%PDF-" somewhere inside for a PDF (a polyglot), so the signature must be at the start.
    ("application/pdf", |d| d.trim_ascii_start().starts_with(b"%PDF-")),
    ("image/jpeg", |d| d.starts_with(&[0xFF, 0xD8, 0xFF])),
    ("image/png", |d| d.starts_with(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A])),
    ("image/gif", |d| d.starts_with(b"GIF87a") || d.starts_with(b"GIF89a")),
    ("image/tiff", |d| d.starts_with(b"II*\0") || d.starts_with(b"MM\0*")),
    ("image/webp", |d| d.len() >= 12 && d.starts_with(b"RIFF") && &d[8..12] == b"WEBP"),
    // PostScript Language Reference 3, 5.1: "%!" (usually "%!PS-Adobe-3.0").
    ("application/postscript", |d| d.starts_with(b"%!")),
    ("application/zip", |d| d.starts_with(b"PK\x03\x04")),
    ("application/x-ole-storage", |d| d.starts_with(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1])),
    ("application/x-msdownload", |d| d.starts_with(b"MZ")),
    ("application/x-executable", |d| d.starts_with(b"\x7FELF")),
];

/// What the first bytes of `data` say it is.
pub fn sniff(data: &[u8]) -> Option<&'static str> {
    MAGIC.iter().find(|(_, m)| m(data)).map(|(t, _)| *t)
}

/// Whether `claimed` is a type with a known signature, and whether `data` carries it.
fn carries_magic(claimed: &str, data: &[u8]) -> Option<bool> {
    if claimed == "image/bmp" {
        // "BM" is too short to sniff for, but enough to confirm a claim.
        return Some(data.starts_with(b"BM"));
    }
    MAGIC.iter().find(|(t, _)| *t == claimed).map(|(_, m)| m(data))
}

/// Container formats whose own signature other types share (Office Open XML and OpenDocument
/// are ZIP files, Office 97 files are OLE compound files).
fn container_fits(claimed: &str, found: &str) -> bool {
    match found {
        "application/zip" => {
            claimed.ends_with("+zip") || claimed.contains("openxmlformats") || claimed.contains("opendocument")
        }
        "application/x-ole-storage" => {
            claimed == "application/msword" || claimed.starts_with("application/vnd.ms-") || claimed.contains("visio")
        }
        _ => false,
    }
}

/// Every address of the From field; the first is the sender.
pub fn sender_of(msg: &Message<'_>) -> Result<(Sender, Vec<String>), Refusal> {
    let from = msg.from().ok_or(Refusal::NoSender)?;
    let all: Vec<String> = from.iter().filter_map(|a| a.address()).map(|a| a.trim().to_string()).collect();
    let first = from.iter().find(|a| a.address().is_some()).ok_or(Refusal::NoSender)?;
    let sender = Sender {
        address: first.address().unwrap_or_default().trim().to_string(),
        name: first.name().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()),
    };
    if sender.address.is_empty() {
        return Err(Refusal::NoSender);
    }
    Ok((sender, all))
}

impl Policy {
    pub fn from_config(m: &Mailbox) -> Policy {
        Policy {
            senders: m.senders.clone(),
            types: m.types.iter().map(|t| normalise_type(t)).collect(),
            max_size: m.max_size.0,
            print_body: m.print_body,
            require_authenticated: m.require_authenticated_sender,
            trust: Trust { authserv_id: m.authserv_id.clone(), exchange_internal: false },
        }
    }

    /// Whether the receiving server vouches for every address of `from` ([`super::authres`]).
    pub fn authenticated(&self, msg: &Message<'_>, from: &[String]) -> bool {
        authres::from_authenticated(&authres::fields(msg), from, &self.trust)
    }

    /// The sender, checked: with an allow-list and `require_authenticated_sender`, the From
    /// must be authenticated before the list is consulted (a forged From would pass it).
    pub fn check_from(&self, msg: &Message<'_>) -> Result<(Sender, Vec<String>), Refusal> {
        let (sender, all) = sender_of(msg)?;
        if self.require_authenticated && !self.senders.is_empty() && !self.authenticated(msg, &all) {
            return Err(Refusal::Unauthenticated(sender.address));
        }
        self.check_sender(&all)?;
        Ok((sender, all))
    }

    /// Whether a refusal may be answered as far as authentication goes: an answer to a forged
    /// From would go to someone who never wrote (backscatter).
    pub fn may_answer(&self, msg: &Message<'_>, from: &[String]) -> bool {
        !self.require_authenticated || self.authenticated(msg, from)
    }

    /// Every `From` address must be allowed (a second, allowed address does not make a
    /// forged first one acceptable, nor the other way round).
    pub fn check_sender(&self, addresses: &[String]) -> Result<(), Refusal> {
        if addresses.is_empty() {
            return Err(Refusal::NoSender);
        }
        if self.senders.is_empty() {
            return Ok(());
        }
        match addresses.iter().find(|a| !self.senders.iter().any(|p| p.matches(a))) {
            Some(bad) => Err(Refusal::Sender(bad.clone())),
            None => Ok(()),
        }
    }

    pub fn check_size(&self, size: u64) -> Result<(), Refusal> {
        if size > self.max_size {
            return Err(Refusal::TooLarge { size, max: self.max_size });
        }
        Ok(())
    }

    /// Whether the `types` allow-list admits `t` (normalised).
    pub fn type_allowed(&self, t: &str) -> bool {
        self.types.is_empty()
            || self.types.iter().any(|p| match p.strip_suffix("/*") {
                Some(major) => t.split('/').next() == Some(major),
                None => p == t || p == "*" || p == "*/*",
            })
    }

    /// The effective type of one attachment, or why it is refused.
    ///
    /// `declared` is the part's Content-Type (RFC 2045 5.2: none means text/plain, but mail
    /// clients send application/octet-stream for "don't know"), `name` the sender's file name.
    pub fn classify(&self, declared: Option<&str>, name: &str, data: &[u8]) -> Result<String, Refusal> {
        let declared = declared.map(normalise_type).unwrap_or_else(|| "application/octet-stream".into());
        let found = sniff(data);
        let claimed = if declared == "application/octet-stream" || declared.is_empty() {
            type_from_name(name).map(str::to_string).or(found.map(str::to_string))
        } else {
            Some(declared)
        };
        let effective = match claimed {
            None => "application/octet-stream".to_string(),
            Some(claimed) => {
                let consistent = match carries_magic(&claimed, data) {
                    Some(ok) => ok,
                    None => found.is_none_or(|f| container_fits(&claimed, f)),
                };
                if !consistent {
                    return Err(Refusal::Mismatch {
                        name: name.to_string(),
                        claimed,
                        found: found.map(str::to_string),
                    });
                }
                claimed
            }
        };
        if !self.type_allowed(&effective) {
            return Err(Refusal::Type { name: name.to_string(), found: effective, allowed: self.types.clone() });
        }
        Ok(effective)
    }

    /// Turns a mail into the files of a job, or refuses it. The sender must have been checked.
    ///
    /// The attachments' decoded contents are moved out of `msg` into the plan rather than
    /// copied: a large mail is then held once decoded, not twice.
    pub fn plan(&self, msg: &mut Message<'_>) -> Result<Plan, Refusal> {
        let mut plan = self.plan_names(msg)?;
        for f in &mut plan.files {
            if let Some(id) = f.part.take() {
                if let Some(part) = msg.parts.get_mut(id) {
                    f.data = take_contents(part);
                }
            }
        }
        Ok(plan)
    }

    /// The plan with each attachment's part id instead of its data (`part`).
    fn plan_names(&self, msg: &Message<'_>) -> Result<Plan, Refusal> {
        let html: Vec<&str> = msg.parts.iter().filter(|p| p.is_text_html()).filter_map(|p| p.text_contents()).collect();
        let mut plan = Plan::default();
        let mut names = Names::default();
        let parts = msg.attachments.iter().filter_map(|id| Some((*id as usize, msg.parts.get(*id as usize)?)));
        for (i, (id, part)) in parts.enumerate() {
            let original = part.attachment_name().map(str::to_string);
            let shown = original.clone().unwrap_or_else(|| format!("attachment {}", i + 1));
            if is_body_fragment(part) {
                continue;
            }
            if let Some(cid) = embedded_cid(part, &html) {
                plan.skipped.push(format!("embedded picture {cid}"));
                continue;
            }
            let declared = part.content_type().map(|ct| match &ct.c_subtype {
                Some(sub) => format!("{}/{}", ct.c_type, sub),
                None => ct.c_type.to_string(),
            });
            let declared = if part.is_message() { Some("message/rfc822".to_string()) } else { declared };
            let data = part.contents();
            let effective = self.classify(declared.as_deref(), &shown, data)?;
            let safe =
                filename::sanitize(original.as_deref(), &format!("attachment-{}", i + 1), extension_for(&effective));
            let name = names.unique(&safe);
            plan.files.push(PlannedFile {
                original_name: original.filter(|o| *o != name),
                name,
                content_type: effective,
                data: Vec::new(),
                part: Some(id),
            });
        }
        if plan.files.is_empty() {
            let text = msg.body_text(0).map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
            match (self.print_body, text) {
                (true, Some(text)) => {
                    plan.files.push(PlannedFile {
                        name: names.unique(BODY_FILE),
                        original_name: None,
                        content_type: "text/plain".into(),
                        data: format!("{text}\n").into_bytes(),
                        part: None,
                    });
                    plan.body = Some(text);
                }
                (print_body, _) => return Err(Refusal::NothingToPrint { print_body }),
            }
        }
        Ok(plan)
    }
}

/// Moves a part's decoded contents out of the parsed mail (a copy only where they still
/// borrow the raw mail: parts without a transfer encoding).
fn take_contents(part: &mut MessagePart<'_>) -> Vec<u8> {
    match std::mem::take(&mut part.body) {
        PartType::Binary(c) | PartType::InlineBinary(c) => c.into_owned(),
        PartType::Text(t) | PartType::Html(t) => t.into_owned().into_bytes(),
        PartType::Message(m) => m.raw_message.into_owned(),
        PartType::Multipart(_) => Vec::new(),
    }
}

/// A text part that mail-parser lists among the attachments but that is part of the body
/// (inline, no file name): e.g. the text after a picture in an Apple Mail message.
fn is_body_fragment(part: &MessagePart<'_>) -> bool {
    part.is_text() && part.attachment_name().is_none() && !part.content_disposition().is_some_and(|d| d.is_attachment())
}

/// The Content-ID of a picture that the HTML body shows (`cid:`, RFC 2392) and that is not
/// marked as an attachment: a logo or signature image, not a document.
fn embedded_cid(part: &MessagePart<'_>, html: &[&str]) -> Option<String> {
    if part.content_disposition().is_some_and(|d| d.is_attachment()) {
        return None;
    }
    let cid = part.content_id()?.trim().trim_start_matches('<').trim_end_matches('>').to_string();
    if cid.is_empty() {
        return None;
    }
    let needle = format!("cid:{}", cid.to_ascii_lowercase());
    html.iter().any(|h| h.to_ascii_lowercase().contains(&needle)).then_some(cid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MessageParser;

    const PDF: &[u8] = b"%PDF-1.4\n%\xE2\xE3\xCF\xD3\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n";
    const JPEG: &[u8] = &[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10, b'J', b'F', b'I', b'F'];

    fn policy() -> Policy {
        Policy {
            senders: ["*@contoso.com", "boss@partner.test"].into_iter().filter_map(AddressPattern::parse).collect(),
            types: vec!["application/pdf".into(), "image/*".into()],
            max_size: 1000,
            print_body: false,
            require_authenticated: false,
            trust: Trust::default(),
        }
    }

    fn b64(d: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(d)
    }

    /// A multipart/mixed mail with a text part and the given (content type, file name, data).
    fn mail(from: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut m = format!(
            "From: {from}\r\nTo: print@contoso.com\r\nSubject: test\r\nMessage-ID: <1@test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nplease print\r\n"
        );
        for (ct, name, data) in parts {
            m.push_str(&format!("--b\r\nContent-Type: {ct}\r\nContent-Transfer-Encoding: base64\r\n"));
            if let Some(n) = name {
                m.push_str(&format!("Content-Disposition: attachment; filename=\"{n}\"\r\n"));
            }
            m.push_str(&format!("\r\n{}\r\n", b64(data)));
        }
        m.push_str("--b--\r\n");
        m.into_bytes()
    }

    fn plan_of(p: &Policy, raw: &[u8]) -> Result<Plan, Refusal> {
        let mut msg = MessageParser::default().parse(raw).unwrap();
        let (_, all) = sender_of(&msg)?;
        p.check_sender(&all)?;
        // The data moved out of the mail is what it held.
        let expected: Vec<Vec<u8>> = msg.attachments().map(|a| a.contents().to_vec()).collect();
        let plan = p.plan(&mut msg)?;
        for f in &plan.files {
            if f.name != BODY_FILE {
                assert!(expected.contains(&f.data), "{}", f.name);
            }
            assert_eq!(f.part, None);
        }
        Ok(plan)
    }

    #[test]
    fn sniffing_knows_the_usual_suspects() {
        assert_eq!(sniff(PDF), Some("application/pdf"));
        assert_eq!(sniff(JPEG), Some("image/jpeg"));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some("image/png"));
        assert_eq!(sniff(b"GIF89a.."), Some("image/gif"));
        assert_eq!(sniff(b"MZ\x90\0"), Some("application/x-msdownload"));
        assert_eq!(sniff(b"PK\x03\x04...."), Some("application/zip"));
        assert_eq!(sniff(b"hello"), None);
        assert_eq!(sniff(b""), None);
        // White space before %PDF- is tolerated.
        let mut late = b" \r\n\t".repeat(25);
        late.extend_from_slice(PDF);
        assert_eq!(sniff(&late), Some("application/pdf"));
    }

    #[test]
    fn a_pdf_signature_counts_only_at_the_start() {
        let p = Policy { types: vec![], ..policy() };
        // Polyglots: another format's signature at offset 0, "%PDF-" further in.
        let mut exe = b"MZ\x90\0\x03\0\0\0".to_vec();
        exe.extend_from_slice(PDF);
        let mut ps = b"%!PS-Adobe-3.0\n".to_vec();
        ps.extend_from_slice(PDF);
        let mut elf = b"\x7FELF\x02\x01".to_vec();
        elf.extend_from_slice(PDF);
        let mut zip = b"PK\x03\x04\x14\0".to_vec();
        zip.extend_from_slice(PDF);
        let mut junk = b"junk ".to_vec();
        junk.extend_from_slice(PDF);
        for (data, found) in [
            (&exe, Some("application/x-msdownload")),
            (&ps, Some("application/postscript")),
            (&elf, Some("application/x-executable")),
            (&zip, Some("application/zip")),
            (&junk, None),
        ] {
            assert_eq!(sniff(data), found);
            for declared in [Some("application/pdf"), Some("application/octet-stream"), None] {
                assert_eq!(
                    p.classify(declared, "doc.pdf", data),
                    Err(Refusal::Mismatch {
                        name: "doc.pdf".into(),
                        claimed: "application/pdf".into(),
                        found: found.map(str::to_string)
                    }),
                    "{declared:?} {found:?}"
                );
            }
        }
        assert_eq!(p.classify(Some("application/pdf"), "doc.pdf", b"\n\r\n %PDF-1.7\n"), Ok("application/pdf".into()));
    }

    #[test]
    fn classification_checks_claims_against_content() {
        let p = policy();
        assert_eq!(p.classify(Some("application/pdf"), "a.pdf", PDF), Ok("application/pdf".into()));
        assert_eq!(p.classify(Some("Application/PDF; name=a.pdf"), "a.pdf", PDF), Ok("application/pdf".into()));
        assert_eq!(p.classify(Some("image/jpg"), "a.jpg", JPEG), Ok("image/jpeg".into()));
        // octet-stream: the name, then the content decides.
        assert_eq!(p.classify(Some("application/octet-stream"), "scan.pdf", PDF), Ok("application/pdf".into()));
        assert_eq!(p.classify(Some("application/octet-stream"), "noname", JPEG), Ok("image/jpeg".into()));
        // A program that claims to be a PDF.
        assert_eq!(
            p.classify(Some("application/pdf"), "invoice.pdf", b"MZ\x90\0\x03"),
            Err(Refusal::Mismatch {
                name: "invoice.pdf".into(),
                claimed: "application/pdf".into(),
                found: Some("application/x-msdownload".into())
            })
        );
        assert!(matches!(
            p.classify(Some("application/octet-stream"), "invoice.pdf", b"MZ.."),
            Err(Refusal::Mismatch { .. })
        ));
        assert!(matches!(
            p.classify(Some("image/png"), "x.png", b"not a png"),
            Err(Refusal::Mismatch { found: None, .. })
        ));
        // A type without a signature may not hide a program either.
        assert!(matches!(p.classify(Some("text/plain"), "a.txt", b"MZ.."), Err(Refusal::Mismatch { .. })));
        // Not allowed at all.
        let docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";
        assert_eq!(
            p.classify(Some(docx), "letter.docx", b"PK\x03\x04xx"),
            Err(Refusal::Type {
                name: "letter.docx".into(),
                found: docx.into(),
                allowed: vec!["application/pdf".into(), "image/*".into()]
            })
        );
        // ... but a ZIP container is consistent with it, when allowed.
        let open = Policy { types: vec![], ..policy() };
        assert_eq!(open.classify(Some(docx), "letter.docx", b"PK\x03\x04xx"), Ok(docx.into()));
        assert_eq!(open.classify(None, "blob", b"\x00\x01"), Ok("application/octet-stream".into()));
    }

    #[test]
    fn senders_all_from_addresses_must_match() {
        let p = policy();
        assert_eq!(p.check_sender(&["alice@contoso.com".into()]), Ok(()));
        assert_eq!(p.check_sender(&["Alice@CONTOSO.com".into()]), Ok(()));
        assert_eq!(p.check_sender(&["boss@partner.test".into()]), Ok(()));
        assert_eq!(p.check_sender(&["eve@evil.test".into()]), Err(Refusal::Sender("eve@evil.test".into())));
        assert_eq!(
            p.check_sender(&["alice@contoso.com".into(), "eve@evil.test".into()]),
            Err(Refusal::Sender("eve@evil.test".into()))
        );
        assert_eq!(p.check_sender(&[]), Err(Refusal::NoSender));
        let anyone = Policy { senders: vec![], ..policy() };
        assert_eq!(anyone.check_sender(&["x@y.z".into()]), Ok(()));
        assert_eq!(p.check_size(1000), Ok(()));
        assert_eq!(p.check_size(1001), Err(Refusal::TooLarge { size: 1001, max: 1000 }));
    }

    #[test]
    fn a_forged_from_is_refused_without_the_servers_dmarc_pass() {
        let p = Policy { require_authenticated: true, ..policy() };
        let parse = |raw: &[u8]| MessageParser::default().parse(raw).unwrap().into_owned();
        let plain = parse(&mail("alice@contoso.com", &[("application/pdf", Some("a.pdf"), PDF)]));
        assert_eq!(p.check_from(&plain), Err(Refusal::Unauthenticated("alice@contoso.com".into())));
        assert!(!p.may_answer(&plain, &["alice@contoso.com".into()]));
        let with = |ar: &str| {
            let mut raw = format!("Authentication-Results: {ar}\r\n").into_bytes();
            raw.extend(mail("alice@contoso.com", &[("application/pdf", Some("a.pdf"), PDF)]));
            parse(&raw)
        };
        let good = with("mx.contoso.com; dmarc=pass header.from=contoso.com");
        assert_eq!(p.check_from(&good).map(|(s, _)| s.address), Ok("alice@contoso.com".into()));
        assert!(p.may_answer(&good, &["alice@contoso.com".into()]));
        let other = with("mx.contoso.com; dmarc=pass header.from=evil.test");
        assert!(matches!(p.check_from(&other), Err(Refusal::Unauthenticated(_))));
        // Authenticated but not allowed: the allow-list still decides.
        let mut raw = b"Authentication-Results: mx; dmarc=pass header.from=evil.test\r\n".to_vec();
        raw.extend(mail("eve@evil.test", &[]));
        assert_eq!(p.check_from(&parse(&raw)), Err(Refusal::Sender("eve@evil.test".into())));
        // Off: the old behaviour.
        let off = policy();
        assert!(off.check_from(&plain).is_ok() && off.may_answer(&plain, &[]));
    }

    #[test]
    fn two_pdfs_become_two_files() {
        let raw = mail(
            "Alice <alice@contoso.com>",
            &[("application/pdf", Some("a.pdf"), PDF), ("application/pdf", Some("b.pdf"), PDF)],
        );
        let plan = plan_of(&policy(), &raw).unwrap();
        let names: Vec<_> = plan.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.pdf", "b.pdf"]);
        assert_eq!(plan.files[0].data, PDF);
        assert_eq!(plan.files[0].original_name, None);
        assert_eq!(plan.body, None);
    }

    #[test]
    fn hostile_and_colliding_names_are_made_safe() {
        let raw = mail(
            "alice@contoso.com",
            &[
                ("application/pdf", Some("../../etc/passwd"), PDF),
                ("application/pdf", Some("scan.pdf"), PDF),
                ("application/pdf", Some("SCAN.pdf"), PDF),
                ("image/jpeg", None, JPEG),
            ],
        );
        let plan = plan_of(&policy(), &raw).unwrap();
        let names: Vec<_> = plan.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["passwd.pdf", "scan.pdf", "SCAN (2).pdf", "attachment-4.jpg"]);
        assert_eq!(plan.files[0].original_name.as_deref(), Some("../../etc/passwd"));
    }

    #[test]
    fn refusals() {
        let p = policy();
        let raw = mail("eve@evil.test", &[("application/pdf", Some("a.pdf"), PDF)]);
        assert_eq!(plan_of(&p, &raw), Err(Refusal::Sender("eve@evil.test".into())));
        let raw = mail(
            "alice@contoso.com",
            &[("application/pdf", Some("a.pdf"), PDF), ("application/zip", Some("x.zip"), b"PK\x03\x04")],
        );
        assert!(matches!(plan_of(&p, &raw), Err(Refusal::Type { name, .. }) if name == "x.zip"));
        let raw = mail("alice@contoso.com", &[]);
        assert_eq!(plan_of(&p, &raw), Err(Refusal::NothingToPrint { print_body: false }));
        let raw = b"To: x@y\r\nSubject: no from\r\n\r\nhi\r\n";
        assert_eq!(plan_of(&p, raw), Err(Refusal::NoSender));
        let text = Refusal::Type { name: "x.zip".into(), found: "application/zip".into(), allowed: p.types.clone() };
        assert_eq!(
            text.to_string(),
            "the attachment \"x.zip\" is application/zip, which this printer does not print (it prints application/pdf, image/*)"
        );
    }

    #[test]
    fn body_is_printed_only_when_asked() {
        let raw = mail("alice@contoso.com", &[]);
        let p = Policy { print_body: true, ..policy() };
        let plan = plan_of(&p, &raw).unwrap();
        assert_eq!(plan.body.as_deref(), Some("please print"));
        assert_eq!(plan.files.len(), 1);
        assert_eq!(plan.files[0].name, BODY_FILE);
        assert_eq!(plan.files[0].data, b"please print\n");
    }

    #[test]
    fn embedded_logo_is_skipped_but_an_attached_picture_is_not() {
        let raw = format!(
            "From: alice@contoso.com\r\nSubject: s\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"m\"\r\n\r\n\
             --m\r\nContent-Type: multipart/related; boundary=\"r\"\r\n\r\n\
             --r\r\nContent-Type: text/html\r\n\r\n<p>hi</p><img src=\"cid:LOGO@x\">\r\n\
             --r\r\nContent-Type: image/png; name=\"image001.png\"\r\nContent-ID: <logo@x>\r\nContent-Disposition: inline; filename=\"image001.png\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{png}\r\n\
             --r--\r\n\
             --m\r\nContent-Type: application/pdf; name=\"doc.pdf\"\r\nContent-Disposition: attachment; filename=\"doc.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{pdf}\r\n\
             --m--\r\n",
            png = b64(b"\x89PNG\r\n\x1a\nxxxx"),
            pdf = b64(PDF)
        );
        let plan = plan_of(&policy(), raw.as_bytes()).unwrap();
        assert_eq!(plan.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["doc.pdf"]);
        assert_eq!(plan.skipped, ["embedded picture logo@x"]);
    }

    #[test]
    fn a_single_part_pdf_mail_is_one_file() {
        let raw = format!(
            "From: alice@contoso.com\r\nSubject: s\r\nMIME-Version: 1.0\r\nContent-Type: application/pdf; name=\"only.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n",
            b64(PDF)
        );
        let plan = plan_of(&policy(), raw.as_bytes()).unwrap();
        assert_eq!(plan.files.len(), 1);
        assert_eq!(plan.files[0].name, "only.pdf");
    }

    #[test]
    fn forwarded_mail_as_attachment_is_refused_unless_allowed() {
        let raw = "From: alice@contoso.com\r\nSubject: fw\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nFrom: x@y\r\nSubject: inner\r\n\r\ninner body\r\n--b--\r\n";
        assert!(
            matches!(plan_of(&policy(), raw.as_bytes()), Err(Refusal::Type { found, .. }) if found == "message/rfc822")
        );
    }
}
