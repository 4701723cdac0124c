//! File and folder names for scan to folder (`[[destination]] folder` and `file_name`):
//! templates with placeholders, rendered per file, and names made safe for SharePoint,
//! OneDrive and Google Drive. A leaf module: `config` checks templates with it.
//!
//! Safe means what SharePoint Online accepts, the strictest of the three: no `" * : < > ? / \ |`
//! or control characters, no leading or trailing space or dot, no `..`, none of the names
//! Windows or SharePoint reserve (`CON`, `LPT1`, `desktop.ini`, `~$…`, `_vti_`), and at most
//! [`MAX_NAME_BYTES`] per name (SharePoint allows 255 per name and 400 for the whole path).

use chrono::{Datelike, Timelike};

/// The longest name (file or folder level) rendered, in UTF-8 bytes: SharePoint's limit is
/// 255 per name and 400 characters for the whole path, so a name leaves room for the rest.
pub const MAX_NAME_BYTES: usize = 200;

/// The longest extension kept as one (`.pdf`, `.jpeg`); a longer tail after the last dot is
/// part of the name.
const MAX_EXT_BYTES: usize = 10;

/// The values a template's placeholders take for one file.
#[derive(Debug, Clone)]
pub struct Values<'a> {
    /// When the device's message was received, in the relay's local time.
    pub when: chrono::DateTime<chrono::FixedOffset>,
    /// The device's name.
    pub device: &'a str,
    /// The attachment's own file name, as the device gave it (made safe when rendered).
    pub name: &'a str,
    /// The destination's name.
    pub destination: &'a str,
    /// The queue id of the message.
    pub id: &'a str,
    /// The file's number within the message, from 1.
    pub n: usize,
}

/// One placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Year4,
    Year2,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    Device,
    Destination,
    Id,
    N,
    Name,
    Stem,
    Ext,
}

/// Every placeholder as written in a template.
const FIELDS: [(&str, Field); 14] = [
    ("yyyy", Field::Year4),
    ("yy", Field::Year2),
    ("MM", Field::Month),
    ("dd", Field::Day),
    ("HH", Field::Hour),
    ("mm", Field::Minute),
    ("ss", Field::Second),
    ("device", Field::Device),
    ("destination", Field::Destination),
    ("id", Field::Id),
    ("n", Field::N),
    ("name", Field::Name),
    ("stem", Field::Stem),
    ("ext", Field::Ext),
];

impl Field {
    /// The attachment's own name or part of it: for file names only.
    fn is_file_only(self) -> bool {
        matches!(self, Field::Name | Field::Stem | Field::Ext)
    }

    fn written(self) -> &'static str {
        FIELDS.iter().find(|(_, f)| *f == self).map(|(s, _)| *s).unwrap_or_default()
    }

    /// The placeholder's value for one file, before it is made safe.
    fn value(self, v: &Values<'_>) -> String {
        let own = base_name(v.name);
        match self {
            Field::Year4 => format!("{:04}", v.when.year()),
            Field::Year2 => format!("{:02}", v.when.year().rem_euclid(100)),
            Field::Month => format!("{:02}", v.when.month()),
            Field::Day => format!("{:02}", v.when.day()),
            Field::Hour => format!("{:02}", v.when.hour()),
            Field::Minute => format!("{:02}", v.when.minute()),
            Field::Second => format!("{:02}", v.when.second()),
            Field::Device => v.device.to_string(),
            Field::Destination => v.destination.to_string(),
            Field::Id => v.id.to_string(),
            Field::N => v.n.to_string(),
            Field::Name => own.to_string(),
            Field::Stem => split_ext(own).0.to_string(),
            Field::Ext => split_ext(own).1.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses a template; the error names the unknown or unclosed placeholder.
    /// `{{` and `}}` are literal braces.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(['{', '}']) {
            lit.push_str(&rest[..i]);
            let brace = &rest[i..];
            if let Some(after) = brace.strip_prefix("{{").or_else(|| brace.strip_prefix("}}")) {
                lit.push_str(&brace[..1]);
                rest = after;
                continue;
            }
            if brace.starts_with('}') {
                return Err(format!("a lone }} at \"{}\" (write }}}} for a brace)", shown(brace)));
            }
            let Some(end) = brace.find('}') else {
                return Err(format!("unclosed {{ at \"{}\" (write {{{{ for a brace)", shown(brace)));
            };
            let key = &brace[1..end];
            let Some((_, field)) = FIELDS.iter().find(|(k, _)| *k == key) else {
                let known: Vec<String> = FIELDS.iter().map(|(k, _)| format!("{{{k}}}")).collect();
                return Err(format!(
                    "unknown placeholder {{{}}} (known, case matters: {})",
                    shown(key),
                    known.join(" ")
                ));
            };
            if !lit.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut lit)));
            }
            parts.push(Part::Field(*field));
            rest = &brace[end + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Text(lit));
        }
        Ok(Template { text: text.to_string(), parts })
    }

    /// Parses a `folder` template: as [`Template::parse`], and refuses the placeholders of
    /// the attachment's own name (`{name}`, `{stem}`, `{ext}`), which are for `file_name`.
    pub fn parse_folder(text: &str) -> Result<Template, String> {
        let t = Template::parse(text)?;
        if let Some(f) = t.fields().find(|f| f.is_file_only()) {
            return Err(format!(
                "{{{}}} is the attachment's own name, for file_name only (a folder is one per message)",
                f.written()
            ));
        }
        Ok(t)
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn fields(&self) -> impl Iterator<Item = Field> + '_ {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(*f),
            Part::Text(_) => None,
        })
    }

    /// The file name for one file, made safe (never empty). It ends with the attachment's
    /// extension, added when the template does not bring it.
    pub fn file_name(&self, v: &Values<'_>) -> String {
        // One level: a `/` of the template itself is a character like any other.
        let mut raw = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => raw.push_str(t),
                Part::Field(f) => raw.push_str(&f.value(v)),
            }
        }
        let ext = split_ext(base_name(v.name)).1;
        let mut name = clean(&raw);
        if name.is_empty() {
            name = format!("scan-{}", v.n);
        }
        if !ext.is_empty() && !ends_with_ext(&name, ext) {
            name = clean(&format!("{name}.{ext}"));
        }
        fit(name, ext)
    }

    /// The folder path for one file, one safe name per level (empty levels dropped). Only
    /// the template's own `/` separate levels: a `/` in a value (a device's name) does not.
    pub fn folder_path(&self, v: &Values<'_>) -> Vec<String> {
        let mut levels = vec![String::new()];
        for p in &self.parts {
            match p {
                Part::Text(t) => {
                    let mut pieces = t.split('/');
                    if let (Some(first), Some(last)) = (pieces.next(), levels.last_mut()) {
                        last.push_str(first);
                    }
                    levels.extend(pieces.map(str::to_string));
                }
                Part::Field(f) => {
                    if let Some(last) = levels.last_mut() {
                        last.push_str(&f.value(v).replace('/', "_"));
                    }
                }
            }
        }
        levels
            .into_iter()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let name = clean(&l);
                fit(if name.is_empty() { "scan".to_string() } else { name }, "")
            })
            .collect()
    }
}

/// At most 40 characters of a template, for an error message.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(40).collect();
    if cut.len() < s.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

/// The last path component of an attachment's name: RFC 2183 2.3, the receiver does not
/// follow directory paths in a filename parameter (`C:\scans\a.pdf`, `../../etc/passwd`).
fn base_name(name: &str) -> &str {
    name.rsplit(['/', '\\']).next().unwrap_or(name)
}

/// A name's stem and extension (without the dot). An extension is 1 to [`MAX_EXT_BYTES`]
/// ASCII letters and digits after the last dot, with something before it: `.profile` and
/// `notes.final version` have none.
fn split_ext(name: &str) -> (&str, &str) {
    match name.rsplit_once('.') {
        Some((stem, ext))
            if !stem.is_empty()
                && !ext.is_empty()
                && ext.len() <= MAX_EXT_BYTES
                && ext.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            (stem, ext)
        }
        _ => (name, ""),
    }
}

fn ends_with_ext(name: &str, ext: &str) -> bool {
    name.len() > ext.len()
        && name.is_char_boundary(name.len() - ext.len() - 1)
        && name[name.len() - ext.len() - 1..].eq_ignore_ascii_case(&format!(".{ext}"))
}

/// Characters no name may hold: SharePoint's forbidden ones, path separators, control
/// characters, and the invisible ones that make a name read differently from what it is
/// (bidirectional overrides: `cod\u{202E}fdp.exe` shows as `codexe.pdf`).
fn forbidden(c: char) -> bool {
    matches!(c, '"' | '*' | ':' | '<' | '>' | '?' | '/' | '\\' | '|')
        || c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Names Windows reserves whatever their extension (`CON.pdf` too).
fn is_device_name(stem: &str) -> bool {
    let s = stem.trim_end_matches(' ').to_ascii_uppercase();
    matches!(s.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || (s.len() == 4 && (s.starts_with("COM") || s.starts_with("LPT")) && s.as_bytes()[3].is_ascii_digit())
}

/// One name made safe, without the length limit: forbidden characters become `_`, runs of
/// dots one dot, no leading or trailing space or dot, reserved names prefixed with `_`.
/// May be empty.
fn clean(raw: &str) -> String {
    let mut s = String::with_capacity(raw.len());
    for c in raw.chars() {
        let c = if forbidden(c) { '_' } else { c };
        // No `..` anywhere: SharePoint refuses it, and nothing can climb a level.
        if c == '.' && s.ends_with('.') {
            continue;
        }
        s.push(c);
    }
    let trimmed = s.trim_matches(|c: char| c == '.' || c.is_whitespace());
    let mut s = trimmed.to_string();
    // SharePoint refuses `_vti_` anywhere in a name.
    while let Some(i) = s.to_ascii_lowercase().find("_vti_") {
        s.replace_range(i..i + 1, "-");
    }
    let first = s.split('.').next().unwrap_or_default();
    let lower = s.to_ascii_lowercase();
    // `.lock` cannot be left: no name starts with a dot.
    if is_device_name(first) || lower == "desktop.ini" || s.starts_with("~$") {
        s.insert(0, '_');
    }
    s
}

/// `name` cut to [`MAX_NAME_BYTES`] on a character boundary, keeping `.ext` when it ends
/// with it. `name` is [`clean`] and not empty; what is left after the cut is cleaned again
/// (`CON` + 300 spaces + `x.pdf` must not become `CON.pdf`).
fn fit(name: String, ext: &str) -> String {
    if name.len() <= MAX_NAME_BYTES {
        return name;
    }
    let suffix = if !ext.is_empty() && ends_with_ext(&name, ext) { &name[name.len() - ext.len() - 1..] } else { "" };
    let mut budget = MAX_NAME_BYTES - suffix.len();
    loop {
        let mut end = budget;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let base = name[..end].trim_end_matches(|c: char| c == '.' || c.is_whitespace());
        let out = clean(&format!("{base}{suffix}"));
        // Cleaning may add a `_` in front of a reserved name.
        if out.len() <= MAX_NAME_BYTES {
            return out;
        }
        budget = end - 1;
    }
}

/// Whether `name` is one safe name as [`Template::file_name`] and [`Template::folder_path`]
/// make them: for the fuzz target and the tests.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.contains(forbidden)
        && !name.contains("..")
        && !name.starts_with(|c: char| c == '.' || c.is_whitespace())
        && !name.ends_with(|c: char| c == '.' || c.is_whitespace())
        && !name.to_ascii_lowercase().contains("_vti_")
        && !name.starts_with("~$")
        && !is_device_name(name.split('.').next().unwrap_or_default())
        && !name.eq_ignore_ascii_case("desktop.ini")
        && !name.eq_ignore_ascii_case(".lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(name: &'a str, device: &'a str) -> Values<'a> {
        Values {
            when: chrono::DateTime::parse_from_rfc3339("2026-03-07T09:05:02+01:00").expect("date"),
            device,
            name,
            destination: "finance",
            id: "Q123",
            n: 2,
        }
    }

    fn file(template: &str, name: &str) -> String {
        let out = Template::parse(template).expect("template").file_name(&values(name, "floor3"));
        assert!(is_safe_name(&out), "{out:?}");
        out
    }

    #[test]
    fn placeholders_render() {
        let v = values("Scan 0001.PDF", "floor3");
        let t = Template::parse("{yyyy}{MM}{dd}-{HH}{mm}{ss}-{name}").expect("parse");
        assert_eq!(t.file_name(&v), "20260307-090502-Scan 0001.PDF");
        let t = Template::parse("{yy} {device} {destination} {id} {n} {stem}.{ext}").expect("parse");
        assert_eq!(t.file_name(&v), "26 floor3 finance Q123 2 Scan 0001.PDF");
        let t = Template::parse("{{literal}} {ext}").expect("parse");
        assert_eq!(t.file_name(&v), "{literal} PDF.PDF");
        assert_eq!(t.as_str(), "{{literal}} {ext}");
    }

    #[test]
    fn parse_errors_name_the_placeholder() {
        let e = Template::parse("{yyyy}-{YYYY}").unwrap_err();
        assert!(e.contains("unknown placeholder {YYYY}") && e.contains("{MM}"), "{e}");
        let e = Template::parse("scan-{device").unwrap_err();
        assert!(e.contains("unclosed {") && e.contains("{device"), "{e}");
        let e = Template::parse("a}b").unwrap_err();
        assert!(e.contains("lone }"), "{e}");
        assert!(Template::parse("{}").unwrap_err().contains("unknown placeholder {}"));
        assert!(Template::parse("").is_ok());
        for f in ["{name}", "x/{stem}", "{ext}"] {
            let e = Template::parse_folder(f).unwrap_err();
            assert!(e.contains("for file_name only"), "{e}");
        }
        assert!(Template::parse_folder("Scans/{device}/{yyyy}-{MM}").is_ok());
    }

    #[test]
    fn the_extension_is_kept_or_added() {
        assert_eq!(file("{yyyy}{MM}{dd}", "a.pdf"), "20260307.pdf");
        assert_eq!(file("{yyyy}{MM}{dd}.PDF", "a.pdf"), "20260307.PDF");
        assert_eq!(file("{stem}", "report.final.pdf"), "report.final.pdf");
        assert_eq!(file("{device}", ".profile"), "floor3");
        assert_eq!(file("x-{name}", "no extension"), "x-no extension");
        // Not an extension: spaces, or too long.
        assert_eq!(file("{n}", "notes.final version"), "2");
        assert_eq!(file("{n}", "a.verylongextension"), "2");
    }

    #[test]
    fn hostile_names_are_made_safe() {
        // A path in the attachment's name: only its last part counts (RFC 2183 2.3).
        assert_eq!(file("{name}", "../../etc/passwd"), "passwd");
        assert_eq!(file("{name}", "C:\\scans\\a.pdf"), "a.pdf");
        assert_eq!(file("{name}", "CON.pdf"), "_CON.pdf");
        assert_eq!(file("{name}", "lpt1"), "_lpt1");
        assert_eq!(file("{name}", "COM0 .txt"), "_COM0 .txt");
        assert_eq!(file("{name}", "a:b*c?.pdf"), "a_b_c_.pdf");
        assert_eq!(file("{name}", "a\"<>|.pdf"), "a____.pdf");
        assert_eq!(file("{name}", "scan\r\n.pdf"), "scan__.pdf");
        assert_eq!(file("{name}", "scan\r\nBcc: x.pdf"), "scan__Bcc_ x.pdf");
        assert_eq!(file("{name}", "desktop.ini"), "_desktop.ini");
        assert_eq!(file("{name}", "~$doc.docx"), "_~$doc.docx");
        assert_eq!(file("{name}", "my_vti_file.pdf"), "my-vti_file.pdf");
        assert_eq!(file("{name}", ".lock"), "lock");
        assert_eq!(file("{name}", "  .hidden. "), "hidden");
        assert_eq!(file("{name}", "a..b...pdf"), "a.b.pdf");
        assert_eq!(file("{name}", "cod\u{202E}fdp.exe"), "cod_fdp.exe");
        assert_eq!(file("{name}", "Quittung 📄 März.pdf"), "Quittung 📄 März.pdf");
        // Nothing left: scan-{n}, with the extension when there was one.
        assert_eq!(file("{name}", ""), "scan-2");
        assert_eq!(file("{name}", "."), "scan-2");
        assert_eq!(file("{name}", ".."), "scan-2");
        assert_eq!(file("{name}", "dir/"), "scan-2");
        assert_eq!(file("{stem}", "...pdf"), "scan-2.pdf");
        assert_eq!(file("", "a.pdf"), "scan-2.pdf");
        // The template's own slash does not make a level in a file name.
        assert_eq!(file("{device}/{name}", "a.pdf"), "floor3_a.pdf");
    }

    #[test]
    fn long_names_are_cut_on_a_character_and_keep_their_extension() {
        let long = format!("{}.pdf", "a".repeat(300));
        let out = file("{name}", &long);
        assert_eq!(out.len(), MAX_NAME_BYTES);
        assert!(out.ends_with("a.pdf"), "{out}");
        let emoji = format!("{}.pdf", "📄".repeat(100));
        let out = file("{name}", &emoji);
        assert!(out.len() <= MAX_NAME_BYTES && out.ends_with("📄.pdf"), "{out}");
        // Dots and spaces at the cut are trimmed.
        let dotted = format!("{}. . .{}.pdf", "b".repeat(193), "c".repeat(50));
        let out = file("{name}", &dotted);
        assert!(out.ends_with("b.pdf") && !out.contains(". "), "{out}");
        let reserved = format!("CON{}x.pdf", " ".repeat(300));
        assert_eq!(file("{name}", &reserved), "_CON.pdf");
        let noext = "é".repeat(300);
        let out = file("{name}", &noext);
        assert_eq!(out.len(), MAX_NAME_BYTES);
    }

    #[test]
    fn folder_levels_come_from_the_template_only() {
        let t = Template::parse_folder("Scans/{device}/{yyyy}-{MM}").expect("parse");
        assert_eq!(t.folder_path(&values("a.pdf", "floor3")), ["Scans", "floor3", "2026-03"]);
        // A device name with a slash stays one level; `..` climbs nothing.
        assert_eq!(t.folder_path(&values("a.pdf", "hq/floor3")), ["Scans", "hq_floor3", "2026-03"]);
        assert_eq!(t.folder_path(&values("a.pdf", "../..")), ["Scans", "_", "2026-03"]);
        assert_eq!(t.folder_path(&values("a.pdf", "..")), ["Scans", "scan", "2026-03"]);
        assert_eq!(t.folder_path(&values("a.pdf", "a\\b:c")), ["Scans", "a_b_c", "2026-03"]);
        assert_eq!(t.folder_path(&values("a.pdf", "CON")), ["Scans", "_CON", "2026-03"]);
        // Empty levels are dropped; an empty template is the destination's root.
        assert_eq!(t.folder_path(&values("a.pdf", "")), ["Scans", "2026-03"]);
        let t = Template::parse_folder("/a//b/").expect("parse");
        assert_eq!(t.folder_path(&values("a.pdf", "x")), ["a", "b"]);
        assert!(Template::parse_folder("").expect("parse").folder_path(&values("a.pdf", "x")).is_empty());
        let t = Template::parse_folder(&format!("{}/{{device}}", "x".repeat(300))).expect("parse");
        let p = t.folder_path(&values("a.pdf", "d"));
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].len(), MAX_NAME_BYTES);
        for level in &p {
            assert!(is_safe_name(level), "{level}");
        }
    }
}
