//! The processes this bench starts (backend, proxies), and what /proc says about them. The
//! mysql bench includes this file by path too (for its server and proxies).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use waitless::close::census::{count_many, Scope};

use crate::procfs;
use crate::tempdir::TempDir;

/// A process this bench started, in a process group of its own; killed with the group.
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    pub child: Child,
    /// Its config, logs and temp files; removed on drop.
    pub dir: TempDir,
}

/// The fields of /proc/PID/stat this bench reads.
pub struct ProcStat {
    /// R, S, Z, ...
    pub state: char,
    pub pgrp: i32,
    /// utime + stime.
    pub ticks: u64,
}

// === impl Proc ===

impl Proc {
    /// Spawns `cmd` in a new process group, stdout and stderr to files in `dir`.
    pub fn spawn(name: &str, cmd: &mut Command, dir: TempDir) -> Result<Proc, String> {
        let log = |f: &str| {
            std::fs::File::create(dir.0.join(f))
                .map(Stdio::from)
                .map_err(|e| format!("{name}: log file: {e}"))
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log("stdout.log")?)
            .stderr(log("stderr.log")?)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("{name}: spawn: {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            dir,
        })
    }

    /// Its pid and those of every process in its group (nginx workers).
    pub fn pids(&self) -> Vec<i32> {
        let pgid = self.child.id() as i32;
        let mut pids = vec![pgid];
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid != pgid && proc_stat(pid).is_some_and(|s| s.pgrp == pgid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// utime + stime of all its processes, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        self.pids()
            .into_iter()
            .filter_map(proc_stat)
            .map(|s| s.ticks)
            .sum()
    }

    /// VmRSS of all its processes, in kB.
    pub fn rss_kb(&self) -> u64 {
        self.pids()
            .into_iter()
            .filter_map(|pid| procfs::status_kib(pid as u32, "VmRSS"))
            .sum()
    }

    /// Waits until something listens on `port`, counted by the kernel (a probe connection
    /// would be a client connection the census would have to allow for).
    pub fn wait_listening(&mut self, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited at start ({status}): {}",
                    self.name,
                    self.logs()
                ));
            }
            let listening = count_many(&[Scope::LocalPort(port)])
                .ok()
                .and_then(|c| c.first().map(|s| s.listen > 0))
                .unwrap_or(false);
            if listening {
                // nginx's master binds before its workers exist; let them come up.
                std::thread::sleep(Duration::from_millis(200));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "{} did not listen on port {port} within 10 s: {}",
            self.name,
            self.logs()
        ))
    }

    /// The tail of its logs, for error messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for f in ["stderr.log", "stdout.log", "error.log"] {
            if let Ok(text) = std::fs::read_to_string(self.dir.0.join(f)) {
                let tail: String = text.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                if !tail.is_empty() {
                    out.push_str(&format!("[{f}] {tail} "));
                }
            }
        }
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the process group this bench created for its own child.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// The child's exit status if it has exited.
pub fn child_exited(p: &Proc) -> Option<String> {
    let pid = p.child.id() as i32;
    match proc_stat(pid) {
        Some(s) if s.state != 'Z' => None,
        Some(_) => Some(format!("zombie; logs: {}", p.logs())),
        None => Some(format!("gone; logs: {}", p.logs())),
    }
}

/// The process's state, group and CPU time so far; None once it is gone.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); pgrp is field 5, utime 14, stime 15.
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    })
}

/// Clock ticks in microseconds.
pub fn ticks_to_us(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 * 1e6 / hz as f64
}
