//! File-name templates (`mfd_relay::filenames`) never panic, and whatever the template and
//! the values (an attachment's name, a device's name), every rendered name is safe: not
//! empty, no `/`, `\` or control character, no `..`, within the length limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mfd_relay::filenames::{is_safe_name, Template, Values, MAX_NAME_BYTES};

fuzz_target!(|data: &[u8]| {
    // template \0 attachment name \0 device name
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let (template, name, device) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let v = Values {
        when: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default().fixed_offset(),
        device,
        name,
        destination: "finance",
        id: "Q1",
        n: 3,
    };
    let mut names = Vec::new();
    if let Ok(t) = Template::parse(template) {
        names.push(t.file_name(&v));
    }
    if let Ok(t) = Template::parse_folder(template) {
        names.extend(t.folder_path(&v));
    }
    for n in names {
        assert!(is_safe_name(&n), "unsafe name {n:?} from {template:?}, {name:?}, {device:?}");
        assert!(!n.contains(['/', '\\']) && !n.contains(char::is_control) && n.len() <= MAX_NAME_BYTES, "{n:?}");
    }
});
