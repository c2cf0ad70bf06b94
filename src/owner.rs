//! Who owns an open transaction: a process identified by pid, boot id and
//! process start time, so a dead owner is told from a live one even when
//! its pid was reused, in this boot or after a reboot.

use std::fs;

use serde::{Deserialize, Serialize};

/// The identity of a process that owns a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// `/proc/sys/kernel/random/boot_id` of the boot the process ran in.
    pub boot_id: String,
    /// Process start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start: u64,
}

impl Owner {
    /// The calling process.
    pub fn current() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            boot_id: boot_id(),
            start: start_time(pid).unwrap_or(0),
        }
    }

    /// Is this owner a process that is running now? False when the boot id
    /// differs (the machine rebooted), the pid is gone, or the pid now
    /// belongs to a process that started at another time (pid reuse).
    pub fn is_alive(&self) -> bool {
        self.boot_id == boot_id() && start_time(self.pid) == Some(self.start)
    }

    /// Is this the calling process?
    pub fn is_self(&self) -> bool {
        *self == Owner::current()
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} (boot {}, start {})",
            self.pid,
            self.boot_id.get(..8).unwrap_or(&self.boot_id),
            self.start
        )
    }
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Field 22 of `/proc/PID/stat`. The command name (field 2) may hold spaces
/// and parentheses, so the fields are counted after its last `)`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")" come field 3 (state) onwards; field 22 is the 20th of those.
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_process_is_alive() {
        let me = Owner::current();
        assert!(me.start > 0);
        assert!(!me.boot_id.is_empty());
        assert!(me.is_alive());
        assert!(me.is_self());
    }

    #[test]
    fn a_reused_pid_or_another_boot_is_dead() {
        let me = Owner::current();
        assert!(!Owner {
            start: me.start + 1,
            ..me.clone()
        }
        .is_alive());
        assert!(!Owner {
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
            ..me.clone()
        }
        .is_alive());
        assert!(!Owner {
            pid: u32::MAX,
            ..me
        }
        .is_alive());
    }
}
