//! The recipients rewrite for HTTP mail APIs (`mfd_relay::message::recipients`) never panics,
//! and whatever the device's header says, the header that goes to Graph or the Gmail API names
//! only envelope recipients in To, Cc and Bcc, and the plan names each envelope recipient once.
#![no_main]
use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use mail_parser::{Address, HeaderName, HeaderValue, MessageParser};
use mfd_relay::message::recipients::{for_envelope, header_len};
use mfd_relay::message::{rewrite_message, Changes};

const ENVELOPE: [&str; 2] = ["a@x.test", "b@x.test"];

fuzz_target!(|msg: &[u8]| {
    // The message as the spool holds it: the relay's own header rewrite ran first.
    let c = Changes {
        received: "Received: from fuzz",
        rewrite_from: None,
        hostname: "relay.test",
        unique: "FUZZ",
        now: chrono::DateTime::from_timestamp(0, 0).unwrap_or_default(),
    };
    let Ok(spooled) = rewrite_message(msg, &c) else { return };
    let Some(n) = header_len(&spooled) else { return };
    let envelope: Vec<String> = ENVELOPE.iter().map(|s| s.to_string()).collect();
    let (plan, new) = for_envelope(&spooled[..n], &envelope);
    let named: Vec<String> =
        plan.to.iter().chain(&plan.cc).chain(&plan.bcc).map(|a| a.to_ascii_lowercase()).collect();
    let unique: BTreeSet<&String> = named.iter().collect();
    assert_eq!(unique.len(), named.len(), "a recipient named twice: {plan:?}");
    assert_eq!(unique, envelope.iter().collect(), "the plan is not the envelope: {plan:?}");
    let mut header = new.unwrap_or_else(|| spooled[..n].to_vec());
    header.extend_from_slice(b"\r\n");
    let Some(parsed) = MessageParser::default().parse_headers(&header) else { return };
    for h in parsed.headers() {
        if !matches!(h.name, HeaderName::To | HeaderName::Cc | HeaderName::Bcc) {
            continue;
        }
        let list: Vec<_> = match &h.value {
            HeaderValue::Address(Address::List(l)) => l.iter().collect(),
            HeaderValue::Address(Address::Group(g)) => g.iter().flat_map(|g| g.addresses.iter()).collect(),
            _ => Vec::new(),
        };
        for a in list {
            if let Some(addr) = a.address.as_deref() {
                assert!(
                    ENVELOPE.contains(&addr.trim().to_ascii_lowercase().as_str()),
                    "{addr} outside the envelope in {:?}",
                    String::from_utf8_lossy(&header)
                );
            }
        }
    }
});
