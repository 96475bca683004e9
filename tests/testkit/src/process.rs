//! Child processes that cannot outlive their test.
//!
//! [`ChildGuard`] owns a spawned process and kills it when dropped, whether the test passed,
//! failed an assertion or panicked. Its stdout and stderr go to files in a private temporary
//! directory so a failing test can quote the last lines ([`ChildGuard::diagnostics`]) instead of
//! losing them or interleaving them with the test's output.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running child process, killed (SIGKILL) and reaped on drop.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    // Held for its Drop: removes the captured output when the guard goes away.
    _dir: tempfile::TempDir,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout/stderr captured to files.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<ChildGuard> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("testkit-{name}-"))
            .tempdir()
            .context("creating a temp dir for child output")?;
        let stdout_path = dir.path().join("stdout");
        let stderr_path = dir.path().join("stderr");
        let stdout = File::create(&stdout_path)?;
        let stderr = File::create(&stderr_path)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {:?}", cmd.get_program()))?;
        Ok(ChildGuard {
            name: name.to_string(),
            child: Some(child),
            stdout_path,
            stderr_path,
            _dir: dir,
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The directory where this guard keeps its captured output (usable for scratch files
    /// that should disappear with the process).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Fails if the process has already exited, quoting its output.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.try_wait() {
            bail!(
                "{} exited early ({status})\n{}",
                self.name,
                self.diagnostics()
            );
        }
        Ok(())
    }

    /// Waits until stdout contains a line starting with `prefix` and returns that line.
    ///
    /// Polls the captured file; fails early (with diagnostics) if the process exits.
    pub fn wait_for_stdout_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.stdout().lines().find(|l| l.starts_with(prefix)) {
                return Ok(line.to_string());
            }
            self.ensure_running()?;
            if Instant::now() > deadline {
                bail!(
                    "{}: no stdout line starting with {prefix:?} within {timeout:?}\n{}",
                    self.name,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks the process to stop (SIGTERM) and waits up to `grace` before killing it.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        // SAFETY: plain kill(2) on a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// A failure message: the process name plus the tails of its stdout and stderr.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- {name} stdout (tail) ---\n{}\n--- {name} stderr (tail) ---\n{}",
            tail(&self.stdout(), 40),
            tail(&self.stderr(), 60),
            name = self.name
        )
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
    }
}

fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_kills_the_child() {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let guard = ChildGuard::spawn("sleep", cmd).unwrap();
        let pid = guard.id() as libc::pid_t;
        drop(guard);
        // After drop the pid is reaped: signal 0 must fail with ESRCH.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "child {pid} still alive after drop");
    }

    #[test]
    fn captures_output_and_reports_early_exit() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo ready now; echo oops >&2; exit 3"]);
        let mut guard = ChildGuard::spawn("sh", cmd).unwrap();
        let line = guard
            .wait_for_stdout_line("ready", Duration::from_secs(5))
            .unwrap();
        assert_eq!(line, "ready now");
        let err = guard
            .wait_for_stdout_line("never", Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exited early"), "{err}");
        assert!(err.contains("oops"), "{err}");
    }
}
