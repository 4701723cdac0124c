//! The SMTP command parser never panics, and what it accepts is well-formed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mfd_relay::smtp::command::{parse, Command, MAX_PATH};

fuzz_target!(|line: &[u8]| {
    if let Ok(cmd) = parse(line) {
        match cmd {
            Command::Mail { from: Some(a), .. } | Command::Rcpt { to: a } => {
                assert!(a.len() <= MAX_PATH && a.is_ascii() && a.contains('@'));
                assert!(!a.contains(['\r', '\n', ' ']));
            }
            Command::Ehlo(n) | Command::Helo(n) => assert!(!n.is_empty() && !n.chars().any(|c| c.is_control())),
            _ => {}
        }
    }
});
