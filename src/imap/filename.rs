//! Safe file names for the attachments of a print job.
//!
//! An attachment's name is whatever the sender wrote (RFC 2183 `filename`, RFC 2231 or
//! RFC 2047 encoded, decoded by mail-parser), so it is hostile input: `../../etc/passwd`, names
//! with control characters or right-to-left overrides that disguise the extension, Windows
//! device names, names a share cannot store, names that collide. [`sanitize`] keeps the last
//! path component and only characters that are harmless on any file system the spool may be
//! shared from; [`Names`] resolves collisions (case-insensitively, as on SMB shares) and
//! never hands out the name of the job's own `job.json`.

use std::collections::HashSet;

/// The longest file name written (bytes; ext4 and NTFS allow 255, and the spool may be shared).
pub const MAX_NAME_BYTES: usize = 120;
/// Extensions longer than this are not kept apart when a name is shortened.
const MAX_EXTENSION_BYTES: usize = 16;
/// Characters that Windows and SMB shares cannot store, replaced by `_`.
const FORBIDDEN: &[char] = &['<', '>', ':', '"', '|', '?', '*', '/', '\\'];
/// Device names Windows refuses as file names, whatever their extension.
const WINDOWS_DEVICES: &[&str] = &[
    "con", "prn", "aux", "nul", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8", "com9", "lpt1", "lpt2",
    "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
];

/// Names in a job folder that belong to the relay.
pub const JOB_JSON: &str = "job.json";

/// Invisible formatting characters that can disguise a name (bidi overrides such as U+202E
/// turn `fdp.exe` into what looks like `exe.pdf`; zero-width characters hide anything).
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{00AD}')
}

/// A file name that is safe inside a job folder, from the sender's `original` name.
///
/// `fallback` is used when nothing usable is left (e.g. `attachment-2`); `extension` (without
/// the dot, from the attachment's type) is added when the name has none, so that a print
/// command can tell what the file is.
pub fn sanitize(original: Option<&str>, fallback: &str, extension: Option<&str>) -> String {
    let original = original.unwrap_or("");
    // Only the last path component, whatever the separator (`/`, `\`): no traversal.
    let last = original.rsplit(['/', '\\']).find(|s| !s.trim().is_empty()).unwrap_or("");
    let mut name = String::with_capacity(last.len());
    let mut space = false;
    for c in last.chars() {
        // A tab is a space; line breaks and other control characters go.
        if c == '\t' || (c.is_whitespace() && !c.is_control()) {
            space = true;
            continue;
        }
        if c.is_control() || is_invisible(c) {
            continue;
        }
        if space && !name.is_empty() {
            name.push(' ');
        }
        space = false;
        name.push(if FORBIDDEN.contains(&c) { '_' } else { c });
    }
    // No hidden files, no "." or "..", nothing Windows would silently strip.
    let name = name.trim_start_matches(['.', ' ']).trim_end_matches(['.', ' ']);
    let mut name = if name.is_empty() { fallback.to_string() } else { name.to_string() };
    let stem = name.split('.').next().unwrap_or("").trim_end().to_ascii_lowercase();
    // A leading "-" would make the name an option to a print command that takes it as an
    // argument (`lp -d floor3 -o...`); `{file}` is an absolute path, but a command may also
    // be given the bare name.
    if WINDOWS_DEVICES.contains(&stem.as_str()) || name.starts_with('-') {
        name.insert(0, '_');
    }
    if let Some(ext) = extension.filter(|e| !e.is_empty()) {
        if split_extension(&name).1.is_empty() {
            name.push('.');
            name.push_str(ext);
        }
    }
    shorten(&name, MAX_NAME_BYTES)
}

/// `("report", ".pdf")`; the extension is empty when there is none (or it is implausibly long).
fn split_extension(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) if i > 0 && name.len() - i <= MAX_EXTENSION_BYTES + 1 && name.len() - i > 1 => name.split_at(i),
        _ => (name, ""),
    }
}

/// Cuts `name` to at most `max` bytes on a character boundary, keeping its extension.
fn shorten(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_string();
    }
    let (stem, ext) = split_extension(name);
    let room = max.saturating_sub(ext.len());
    let mut cut = room.min(stem.len());
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{ext}", stem[..cut].trim_end())
}

/// The names handed out in one job folder so far (case-insensitive, like SMB shares).
#[derive(Debug)]
pub struct Names {
    taken: HashSet<String>,
}

impl Default for Names {
    fn default() -> Self {
        Names { taken: HashSet::from([JOB_JSON.to_string()]) }
    }
}

impl Names {
    /// `name`, or `name (2)`, `name (3)`... before the extension, whichever is still free.
    pub fn unique(&mut self, name: &str) -> String {
        if self.taken.insert(name.to_lowercase()) {
            return name.to_string();
        }
        let (stem, ext) = split_extension(name);
        for n in 2u32.. {
            let suffix = format!(" ({n})");
            let stem = shorten(stem, MAX_NAME_BYTES.saturating_sub(ext.len() + suffix.len()));
            let candidate = format!("{stem}{suffix}{ext}");
            if self.taken.insert(candidate.to_lowercase()) {
                return candidate;
            }
        }
        unreachable!("u32 names run out before memory does")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str) -> String {
        sanitize(Some(name), "attachment-1", Some("pdf"))
    }

    #[test]
    fn path_traversal_keeps_only_the_last_component() {
        assert_eq!(s("../../etc/passwd"), "passwd.pdf");
        assert_eq!(s("..\\..\\Windows\\win.ini"), "win.ini");
        assert_eq!(s("C:\\Users\\alice\\scan.pdf"), "scan.pdf");
        assert_eq!(s("/etc/"), "etc.pdf");
        assert_eq!(s(".."), "attachment-1.pdf");
        assert_eq!(s("../"), "attachment-1.pdf");
        assert_eq!(s("/"), "attachment-1.pdf");
    }

    #[test]
    fn control_and_invisible_characters_go() {
        assert_eq!(s("a\u{7}b\r\n.pdf"), "ab.pdf");
        assert_eq!(s("in\u{0}voice.pdf"), "invoice.pdf");
        // With U+202E between "invoice" and "fdp.exe", the name displays as "invoiceexe.pdf".
        assert_eq!(s("invoice\u{202E}fdp.exe"), "invoicefdp.exe");
        assert_eq!(s("\u{200B}.bashrc"), "bashrc.pdf");
        assert_eq!(s("tab\there.pdf"), "tab here.pdf");
    }

    #[test]
    fn forbidden_characters_hidden_files_and_devices() {
        assert_eq!(s("what?*<>|\":.pdf"), "what_______.pdf");
        assert_eq!(s(".hidden.pdf"), "hidden.pdf");
        assert_eq!(s("trailing.pdf. . "), "trailing.pdf");
        assert_eq!(s("CON.pdf"), "_CON.pdf");
        assert_eq!(s("lpt1"), "_lpt1.pdf");
        assert_eq!(s("console.pdf"), "console.pdf");
        assert_eq!(s("  many   spaces  .pdf"), "many spaces .pdf");
    }

    #[test]
    fn a_name_never_starts_with_a_dash() {
        assert_eq!(s("-rf.pdf"), "_-rf.pdf");
        assert_eq!(s("--help"), "_--help.pdf");
        assert_eq!(s("../-o evil.pdf"), "_-o evil.pdf");
        assert_eq!(s(" . -x.pdf"), "_-x.pdf");
        assert_eq!(s("a-b.pdf"), "a-b.pdf");
        assert_eq!(sanitize(Some("-"), "attachment-1", None), "_-");
        let mut n = Names::default();
        assert!(!n.unique(&s("-a.pdf")).starts_with('-'));
    }

    #[test]
    fn missing_names_and_extensions() {
        assert_eq!(sanitize(None, "attachment-3", Some("jpg")), "attachment-3.jpg");
        assert_eq!(sanitize(Some("scan"), "x", Some("pdf")), "scan.pdf");
        assert_eq!(sanitize(Some("scan.PDF"), "x", Some("pdf")), "scan.PDF");
        assert_eq!(sanitize(Some("scan"), "x", None), "scan");
        assert_eq!(sanitize(Some("Übersicht März.pdf"), "x", None), "Übersicht März.pdf");
    }

    #[test]
    fn long_names_are_cut_on_a_char_boundary_keeping_the_extension() {
        let long = format!("{}.pdf", "ä".repeat(200));
        let out = s(&long);
        assert!(out.len() <= MAX_NAME_BYTES, "{}", out.len());
        assert!(out.ends_with(".pdf"));
        assert!(out.starts_with("ää"));
        let no_ext = "x".repeat(500);
        assert_eq!(sanitize(Some(&no_ext), "f", None).len(), MAX_NAME_BYTES);
    }

    #[test]
    fn collisions_are_resolved_case_insensitively_and_job_json_is_reserved() {
        let mut n = Names::default();
        assert_eq!(n.unique("scan.pdf"), "scan.pdf");
        assert_eq!(n.unique("SCAN.pdf"), "SCAN (2).pdf");
        assert_eq!(n.unique("scan.pdf"), "scan (3).pdf");
        assert_eq!(n.unique("job.json"), "job (2).json");
        assert_eq!(n.unique("README"), "README");
        assert_eq!(n.unique("readme"), "readme (2)");
        let long = format!("{}.pdf", "y".repeat(MAX_NAME_BYTES - 4));
        assert_eq!(n.unique(&long), long);
        let again = n.unique(&long);
        assert!(again.len() <= MAX_NAME_BYTES && again.ends_with(" (2).pdf"), "{again}");
    }
}
