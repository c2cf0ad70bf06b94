//! Test support shared by every integration test (`mod support;`): qcow2
//! images with bitmaps, throw-away libvirt domains with unique names, and
//! RAII guards that destroy and undefine them and remove their images.
//!
//! Tests that need the real daemon call [`system`], which panics with the
//! command that starts it: such a test fails, it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

/// The real daemon's URI.
pub const SYSTEM_URI: &str = "qemu:///system";
/// libvirt's in-process test driver (state shared by the process's
/// connections, lost when it exits).
pub const TEST_URI: &str = "test:///default";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A domain name no other test (in this or another process) uses:
/// `ckpt-test-<pid>-<counter>-<tag>`.
pub fn unique_name(tag: &str) -> String {
    format!(
        "ckpt-test-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        tag
    )
}

/// A connection to `qemu:///system`.
///
/// # Panics
///
/// When the daemon does not answer, with the command that starts it.
pub fn system() -> Connect {
    virt::error::clear_error_callback();
    match Connect::open(Some(SYSTEM_URI)) {
        Ok(c) => c,
        Err(e) => panic!(
            "libvirtd is not running for qemu:///system: run `bash tests/support/libvirt.sh start` (as root) ({e})"
        ),
    }
}

/// A connection to the in-process test driver.
pub fn test_driver() -> Connect {
    virt::error::clear_error_callback();
    Connect::open(Some(TEST_URI)).expect("the test driver is built into libvirt")
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img create -f qcow2 <path> 64M`.
pub fn create_image(path: &Path) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("64M"));
}

/// `qemu-img bitmap --add <path> <name>` (persistent, enabled).
pub fn add_bitmap(path: &Path, name: &str) {
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(path)
        .arg(name));
}

/// Disk target names: `vda`, `vdb`, ...
pub fn targets(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("vd{}", (b'a' + i as u8) as char))
        .collect()
}

/// A minimal TCG domain: 64 MiB, one qcow2 virtio disk per image. It
/// declares ACPI: without it libvirt 9.0 passes `-no-acpi`, which QEMU 10
/// refuses.
pub fn domain_xml(name: &str, images: &[PathBuf]) -> String {
    let disks: String = images
        .iter()
        .zip(targets(images.len()))
        .map(|(path, target)| {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='{target}' bus='virtio'/></disk>",
                path.display()
            )
        })
        .collect();
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{disks}\
         <memballoon model='none'/></devices></domain>"
    )
}

/// A defined domain that lives as long as this guard: dropping it destroys
/// the domain if it runs, undefines it with its checkpoint metadata and
/// removes its images.
pub struct TestDomain {
    conn: Connect,
    uri: String,
    /// The domain's unique name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// Disk targets, `vda` first.
    pub targets: Vec<String>,
    /// One qcow2 image per disk, in target order.
    pub images: Vec<PathBuf>,
    dir: tempfile::TempDir,
}

impl TestDomain {
    /// Define a shut-off domain with `disks` fresh qcow2 images.
    pub fn define(conn: &Connect, tag: &str, disks: usize) -> TestDomain {
        let name = unique_name(tag);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .expect("temp dir");
        let images: Vec<PathBuf> = targets(disks)
            .iter()
            .map(|t| dir.path().join(format!("{t}.qcow2")))
            .collect();
        for image in &images {
            create_image(image);
        }
        let dom = conn
            .define_domain_xml(&domain_xml(&name, &images))
            .unwrap_or_else(|e| panic!("cannot define domain {name}: {e}"));
        let uuid = dom.uuid_string().expect("uuid");
        let uri = conn.uri().expect("connection URI");
        TestDomain {
            conn: conn.clone(),
            uri,
            name,
            uuid,
            targets: targets(disks),
            images,
            dir,
        }
    }

    /// Add a bitmap to the image of disk `index` (shut-off domains only:
    /// a running QEMU holds the image).
    pub fn add_bitmap(&self, index: usize, bitmap: &str) {
        add_bitmap(&self.images[index], bitmap);
    }

    /// Add a bitmap to every disk's image.
    pub fn add_bitmap_everywhere(&self, bitmap: &str) {
        for image in &self.images {
            add_bitmap(image, bitmap);
        }
    }

    /// Start the domain (TCG; it sits in firmware).
    pub fn start(&self) {
        self.domain()
            .create()
            .unwrap_or_else(|e| panic!("cannot start domain {}: {e}", self.name));
    }

    /// The libvirt handle.
    pub fn domain(&self) -> Domain {
        self.conn
            .lookup_domain_by_name(&self.name)
            .expect("test domain exists")
    }

    /// Folder holding the images.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        // A test may have broken this connection on purpose: use a new one.
        let dom = match self.conn.lookup_domain_by_name(&self.name) {
            Ok(dom) => dom,
            Err(e) if e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN => return,
            Err(_) => match Connect::open(Some(&self.uri))
                .and_then(|c| c.lookup_domain_by_name(&self.name))
            {
                Ok(dom) => dom,
                Err(e) => {
                    eprintln!("cannot find test domain {} to remove it: {e}", self.name);
                    return;
                }
            },
        };
        if dom.is_active().unwrap_or(false) {
            let _ = dom.destroy();
        }
        // The test driver knows no undefine flags (and keeps no metadata).
        let undefined = dom
            .undefine_flags(sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            .or_else(|e| {
                if e.message().starts_with("unsupported flags") {
                    dom.undefine()
                } else {
                    Err(e)
                }
            });
        if let Err(e) = undefined {
            // Leave the failure visible without a double panic.
            eprintln!("cannot undefine test domain {}: {e}", self.name);
        }
    }
}

/// The script that installs, starts, stops and reports the test daemon
/// (`tests/support/libvirt.sh` at the workspace's root).
pub const LIBVIRT_SCRIPT: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/support/libvirt.sh");

/// Runs `tests/support/libvirt.sh ARG` (`start`, `stop`, `pid`, …).
///
/// # Panics
///
/// When bash cannot be started.
pub fn libvirt_sh(arg: &str) -> std::process::Output {
    Command::new("bash")
        .arg(LIBVIRT_SCRIPT)
        .arg(arg)
        .output()
        .expect("run tests/support/libvirt.sh")
}

/// The test daemon's pid, from its pid file (the script checks that the
/// pid is still a libvirtd), or `None` when it does not run.
pub fn daemon_pid() -> Option<u32> {
    let out = libvirt_sh("pid");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .flatten()
}
