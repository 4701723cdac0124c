//! `mfd-relay check` on setups that parse but cannot relay: no listener (a problem), no
//! device, an identity nothing uses, a device whose identity never signed in (warnings,
//! exit 0), read from the data directory without creating it or taking a running relay's
//! database.

use crate::common::relay::{pin_hash, run_cli, World};

fn check(dir: &std::path::Path, text: &str) -> (i32, String) {
    let config = dir.join("config.toml");
    std::fs::write(&config, text).unwrap();
    let (code, out, err) = run_cli(&config, &["check"], None);
    (code, format!("{out}{err}"))
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

const PROVIDER: &str = "[[provider]]\nname = \"p\"\nkind = \"generic\"\nclient_id = \"c\"\ntoken_url = \"http://127.0.0.1:1/token\"\nsmtp = \"127.0.0.1:2\"\nsmtp_tls = \"none\"\n\n";

#[test]
fn an_empty_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = check(dir.path(), "");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("config.toml:1: no [[listener]]"), "{out}");
    assert!(!out.contains("ok ("), "{out}");
}

#[test]
fn a_relay_without_devices_or_with_an_unused_identity_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[relay]\ndata_dir = \"data\"\n\n[[listener]]\nlisten = \"127.0.0.1:2525\"\n\n{PROVIDER}[[identity]]\nname = \"spare\"\nprovider = \"p\"\nemail = \"spare@example.test\"\nflow = \"device_code\"\n"
    );
    let (code, out) = check(dir.path(), &text);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok (1 listener(s)"), "{out}");
    assert!(out.contains("warning: ") && out.contains("config.toml:5: no [[device]]"), "{out}");
    let at = format!("config.toml:{}: identity \"spare\" is used by no", line_of(&text, "name = \"spare\""));
    assert!(out.contains(&at), "{at}\n{out}");
    assert!(!dir.path().join("data").exists(), "check creates nothing");
}

#[test]
fn a_device_whose_identity_never_signed_in_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[relay]\ndata_dir = \"data\"\n\n[[listener]]\nlisten = \"127.0.0.1:2525\"\n\n{PROVIDER}[[identity]]\nname = \"scans\"\nprovider = \"p\"\nemail = \"scans@example.test\"\nflow = \"device_code\"\n\n[[device]]\nname = \"floor3\"\nidentity = \"scans\"\naddresses = [\"192.168.10.31/32\"]\n"
    );
    let (code, out) = check(dir.path(), &text);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: ")
            && out.contains(&format!(
                "config.toml:{}: device \"floor3\": identity \"scans\" has never signed in",
                line_of(&text, "identity = \"scans\"")
            ))
            && out.contains("mfd-relay auth login scans"),
        "{out}"
    );
    assert!(!dir.path().join("data").exists(), "check creates nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_ins_are_read_from_the_data_directory_unless_the_relay_holds_it() {
    let mut w = World::start_with(
        |e| {
            format!(
                "{}\n[[identity]]\nname = \"scans\"\nprovider = \"fake\"\nemail = \"scans@contoso.test\"\nflow = \"device_code\"\n\n\
                 [[device]]\nname = \"floor3\"\nidentity = \"scans\"\nusername = \"floor3\"\npin_hash = \"{}\"\n",
                e.provider,
                pin_hash()
            )
        },
        |_| {},
    )
    .await;
    let config = w.relay.config.clone();
    // Running: the database is the relay's; check says it did not look.
    let (code, out, err) = run_cli(&config, &["check"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("note: whether devices' identities have signed in was not checked: the relay is running"),
        "{out}"
    );
    assert!(!out.contains("never signed in"), "{out}");
    // Stopped, never signed in: a warning.
    w.relay.stop();
    let (code, out, _) = run_cli(&config, &["check"], None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("device \"floor3\": identity \"scans\" has never signed in"), "{out}");
    // Signed in (a token imported, offline): no warning.
    let token = w.idp.issue_refresh_token("scans@contoso.test");
    let file = w.dir.path().join("scans.token");
    std::fs::write(&file, token).unwrap();
    let (code, out, err) =
        run_cli(&config, &["auth", "import", "scans", "--refresh-token-file", file.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = run_cli(&config, &["check"], None);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("never signed in") && !out.contains("note:"), "{out}");
    // The relay starts again on the same data directory (check left no lock behind).
    w.relay.spawn();
    assert!(w.relay.running(), "{}", w.relay.log());
}

#[test]
fn a_bad_destination_is_refused_with_its_lines() {
    let dir = tempfile::tempdir().unwrap();
    let ms = "[[provider]]\nname = \"m365\"\nkind = \"microsoft\"\ntenant = \"contoso.test\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\n";
    let text = format!(
        "[relay]\ndata_dir = \"data\"\n\n[[listener]]\nlisten = \"127.0.0.1:2525\"\n\n{PROVIDER}{ms}\
         [[identity]]\nname = \"scans\"\nprovider = \"m365\"\nemail = \"scans@contoso.test\"\nflow = \"client_credentials\"\n\
         oversize = \"link\"\noversize_destination = \"finanse\"\n\n\
         [[device]]\nname = \"floor3\"\nidentity = \"scans\"\naddresses = [\"192.168.10.31/32\"]\n\n\
         [[destination]]\nname = \"finance\"\naddress = \"finance@scan.lan\"\nidentity = \"scans\"\nkind = \"sharepoint\"\n\
         site = \"contoso.sharepoint.com/sites/Finance\"\nfolder = \"Scans/{{name}}\"\nfile_name = \"{{YYYY}}-{{name}}\"\n\
         folder_id = \"0AbC\"\n"
    );
    let (code, out) = check(dir.path(), &text);
    assert_eq!(code, 1, "{out}");
    for (needle, message) in [
        ("site = ", "destination \"finance\": site \"contoso.sharepoint.com/sites/Finance\" is not of the form host:/sites/name"),
        ("folder = ", "destination \"finance\": folder: {name} is the attachment's own name, for file_name only"),
        ("file_name = ", "destination \"finance\": file_name: unknown placeholder {YYYY}"),
        ("folder_id = ", "destination \"finance\": folder_id is only for kind = \"google_drive\""),
        ("oversize_destination = ", "identity \"scans\": oversize_destination \"finanse\" is not a defined [[destination]]"),
    ] {
        let at = format!("config.toml:{}: {message}", line_of(&text, needle));
        assert!(out.contains(&at), "{at}\n{out}");
    }
    assert!(!out.contains("ok ("), "{out}");
    // Fixed, it passes.
    let good = text
        .replace("/sites/Finance", ":/sites/Finance")
        .replace("Scans/{name}", "Scans/{device}")
        .replace("{YYYY}", "{yyyy}")
        .replace("folder_id = \"0AbC\"\n", "")
        .replace("\"finanse\"", "\"finance\"");
    let (code, out) = check(dir.path(), &good);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok (1 listener(s)"), "{out}");
}
