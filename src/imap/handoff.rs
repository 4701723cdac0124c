//! The optional hand-off: a command run once per file of a finished job, e.g.
//! `command = ["lp", "-d", "floor3", "{file}"]`.
//!
//! The command runs without a shell (no quoting problems, no injection through file names),
//! in the job folder, with `{file}` replaced by the file's absolute path, and is killed after
//! `command_timeout`. Its exit code, a bounded part of its output and whether it timed out go
//! into job.json. Files are handed over one after the other in the mailbox's own task, so
//! jobs print in the order they arrived. It runs at most once per job: the poller records that it started before it
//! starts it, and a job whose command was interrupted by a crash is not run again (printing
//! twice is worse than asking someone to print one job by hand; the log says which).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::job::HandoffResult;

/// Bytes of stdout and stderr kept, each.
pub const MAX_OUTPUT: usize = 4096;
/// The placeholder replaced by the file's path.
pub const FILE_PLACEHOLDER: &str = "{file}";

/// The command line for one file: every `{file}` in every argument becomes `file` as an
/// absolute path. The command runs in the job folder, so a relative path (a spool given
/// relative to a configuration file named as `-c config.toml`) would point nowhere; an
/// absolute path also never starts with `-`, so it cannot be taken for an option.
pub fn expand(command: &[String], file: &Path) -> Vec<String> {
    let absolute = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let path = absolute.to_string_lossy();
    command.iter().map(|a| a.replace(FILE_PLACEHOLDER, &path)).collect()
}

async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> String {
    let Some(r) = r else { return String::new() };
    let mut buf = Vec::new();
    let _ = r.take(MAX_OUTPUT as u64).read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).trim_end().to_string()
}

/// Runs `command` for `file` (inside `job_dir`), at most `timeout` long.
pub async fn run(command: &[String], file: &Path, job_dir: &Path, timeout: Duration) -> HandoffResult {
    let argv = expand(command, file);
    let started = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let t0 = Instant::now();
    let mut result = HandoffResult {
        file: file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        command: argv.clone(),
        started,
        duration_ms: 0,
        exit_code: None,
        timed_out: false,
        error: None,
        stdout: String::new(),
        stderr: String::new(),
    };
    let Some((program, args)) = argv.split_first() else {
        result.error = Some("empty command".into());
        return result;
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .current_dir(job_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            result.error = Some(format!("cannot run {program}: {e}"));
            return result;
        }
    };
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (stdout, stderr, status) = tokio::join!(read_bounded(out), read_bounded(err), child.wait());
        (stdout, stderr, status)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((stdout, stderr, status)) => {
            result.stdout = stdout;
            result.stderr = stderr;
            match status {
                Ok(s) => {
                    result.exit_code = s.code();
                    if s.code().is_none() {
                        result.error = Some(format!("ended by a signal ({s})"));
                    }
                }
                Err(e) => result.error = Some(e.to_string()),
            }
        }
        Err(_) => {
            result.timed_out = true;
            let _ = child.kill().await;
        }
    }
    result.duration_ms = t0.elapsed().as_millis() as u64;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn placeholder_is_replaced_in_every_argument() {
        let c = cmd(&["lp", "-d", "floor3", "{file}", "-t", "job {file}"]);
        assert_eq!(
            expand(&c, Path::new("/spool/j/a b.pdf")),
            ["lp", "-d", "floor3", "/spool/j/a b.pdf", "-t", "job /spool/j/a b.pdf"]
        );
    }

    #[test]
    fn the_file_is_always_an_absolute_path() {
        let c = cmd(&["lp", "{file}"]);
        let cwd = std::env::current_dir().unwrap();
        let argv = expand(&c, Path::new("spool/print/job1/-x.pdf"));
        assert_eq!(argv[1], cwd.join("spool/print/job1/-x.pdf").to_string_lossy());
        assert!(argv[1].starts_with('/'), "{argv:?}");
        let argv = expand(&c, Path::new("./spool/a.pdf"));
        assert!(Path::new(&argv[1]).is_absolute() && !argv[1].starts_with('-'), "{argv:?}");
    }

    #[tokio::test]
    async fn exit_code_output_and_timeouts_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.pdf");
        std::fs::write(&file, b"x").unwrap();
        let ok = run(
            &cmd(&["sh", "-c", "echo printed $0; echo warn >&2", "{file}"]),
            &file,
            dir.path(),
            Duration::from_secs(10),
        )
        .await;
        assert!(ok.ok(), "{ok:?}");
        assert_eq!(ok.stdout, format!("printed {}", file.display()));
        assert_eq!(ok.stderr, "warn");
        assert_eq!(ok.file, "a.pdf");

        let bad = run(&cmd(&["sh", "-c", "exit 3"]), &file, dir.path(), Duration::from_secs(10)).await;
        assert_eq!((bad.exit_code, bad.ok()), (Some(3), false));

        let slow = run(&cmd(&["sleep", "10"]), &file, dir.path(), Duration::from_millis(200)).await;
        assert!(slow.timed_out && !slow.ok() && slow.duration_ms < 5000, "{slow:?}");

        let missing = run(&cmd(&["/nonexistent/lp"]), &file, dir.path(), Duration::from_secs(1)).await;
        assert!(missing.error.as_deref().is_some_and(|e| e.contains("cannot run")), "{missing:?}");

        let loud = run(&cmd(&["sh", "-c", "yes | head -c 100000"]), &file, dir.path(), Duration::from_secs(10)).await;
        assert!(loud.stdout.len() <= MAX_OUTPUT, "{}", loud.stdout.len());
    }
}
