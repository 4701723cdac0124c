//! AUTH PLAIN/LOGIN decoding never panics; a decoded PLAIN has a username.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mfd_relay::smtp::auth::{decode_line, decode_login_field, decode_plain};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = decode_plain(data) {
        assert!(!c.username.is_empty());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(raw) = decode_line(text) {
            let _ = decode_plain(&raw);
            let _ = decode_login_field(raw);
        }
    }
});
