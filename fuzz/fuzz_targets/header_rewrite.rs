//! The header rewrite never panics on any header section and always yields a From.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mfd_relay::message::{rewrite_header, Changes};

fuzz_target!(|header: &[u8]| {
    let c = Changes {
        received: "Received: from fuzz",
        rewrite_from: Some("scans@contoso.test"),
        hostname: "relay.test",
        unique: "FUZZ",
        now: chrono::DateTime::from_timestamp(0, 0).unwrap_or_default(),
    };
    let out = rewrite_header(header, &c);
    let needle = b"scans@contoso.test";
    assert!(out.windows(needle.len()).any(|w| w == needle), "no rewritten From");
});
