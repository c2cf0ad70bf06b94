//! `qemu-img` (and QMP) helpers shared by the qcow2 tests, the fuzz test and the benches.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One bitmap as `qemu-img info` shows it: name, granularity, in-use, auto.
pub type InfoBitmap = (String, u64, bool, bool);

/// Runs `qemu-img` with these arguments.
pub fn qemu_img_output(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs")
}

/// Runs `qemu-img`, panics with its stderr when it fails, returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let out = qemu_img_output(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("qemu-img prints UTF-8")
}

/// `qemu-img create -f qcow2 [opts] PATH SIZE`.
pub fn create(path: &Path, size: &str, opts: &[&str]) {
    let path = path.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[path, size]);
    qemu_img(&args);
}

/// `qemu-img bitmap --add [-g GRANULARITY] PATH NAME`.
pub fn add_bitmap(path: &Path, name: &str, granularity: Option<&str>) {
    let path = path.to_str().unwrap();
    let mut args = vec!["bitmap", "--add"];
    if let Some(g) = granularity {
        args.extend_from_slice(&["-g", g]);
    }
    args.extend_from_slice(&[path, name]);
    qemu_img(&args);
}

/// Persistent bitmaps `names` added to the qcow2 image at `path` in one
/// QMP `transaction` of a QEMU with no machine (`qemu-img bitmap --add` is
/// a process per bitmap: 10,000 take minutes; this takes seconds), written
/// to the image when QEMU quits.
pub fn add_bitmaps(path: &Path, names: &[String]) {
    use std::io::{BufRead, BufReader, Write};
    let blockdev = format!(
        "driver=qcow2,node-name=d0,file.driver=file,file.filename={}",
        path.display()
    );
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "none", "-nodefaults", "-display", "none"])
        .args(["-qmp", "stdio", "-blockdev", &blockdev])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 runs");
    let mut input = qemu.stdin.take().unwrap();
    let mut output = BufReader::new(qemu.stdout.take().unwrap());
    let mut ask = |command: Value| {
        writeln!(input, "{command}").unwrap();
        loop {
            let mut line = String::new();
            assert!(output.read_line(&mut line).unwrap() > 0, "QEMU quit");
            let reply: Value = serde_json::from_str(&line).unwrap();
            assert!(reply.get("error").is_none(), "QMP {command}: {reply}");
            if reply.get("return").is_some() {
                return;
            }
        }
    };
    ask(serde_json::json!({"execute": "qmp_capabilities"}));
    let actions: Vec<Value> = names
        .iter()
        .map(|n| {
            serde_json::json!({"type": "block-dirty-bitmap-add",
                "data": {"node": "d0", "name": n, "persistent": true}})
        })
        .collect();
    ask(serde_json::json!({"execute": "transaction", "arguments": {"actions": actions}}));
    ask(serde_json::json!({"execute": "quit"}));
    assert!(qemu.wait().unwrap().success());
}

/// `qemu-img bitmap --disable PATH NAME`.
pub fn disable_bitmap(path: &Path, name: &str) {
    qemu_img(&["bitmap", "--disable", path.to_str().unwrap(), name]);
}

/// `qemu-img info --output=json -U PATH`, parsed.
pub fn info(path: &Path) -> Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        "-U",
        path.to_str().unwrap(),
    ]))
    .unwrap()
}

/// `qemu-img info --output=json --backing-chain -U PATH`, parsed, top first.
pub fn info_chain(path: &Path) -> Vec<Value> {
    let out = qemu_img(&[
        "info",
        "--output=json",
        "--backing-chain",
        "-U",
        path.to_str().unwrap(),
    ]);
    serde_json::from_str(&out).unwrap()
}

/// The bitmaps of one `qemu-img info` object, in its order.
pub fn info_bitmaps(info: &Value) -> Vec<InfoBitmap> {
    let Some(list) = info["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            let flags: Vec<&str> = b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap())
                .collect();
            (
                b["name"].as_str().unwrap().to_owned(),
                b["granularity"].as_u64().unwrap(),
                flags.contains(&"in-use"),
                flags.contains(&"auto"),
            )
        })
        .collect()
}

/// The persistent bitmaps a running domain's QEMU holds for the image at
/// `path`, sorted (QEMU writes them into the image only when it closes it,
/// so `qemu-img info` cannot see them while the domain runs):
/// `query-named-block-nodes` through `virsh qemu-monitor-command`.
pub fn running_bitmaps(uri: &str, domain: &str, path: &Path) -> Vec<String> {
    let out = Command::new("virsh")
        .args(["-c", uri, "qemu-monitor-command", domain])
        .arg(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#)
        .output()
        .expect("virsh runs");
    assert!(
        out.status.success(),
        "virsh qemu-monitor-command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("QMP answers JSON");
    let mut names: Vec<String> = v["return"]
        .as_array()
        .expect("a list of nodes")
        .iter()
        .filter(|n| n["drv"] == "qcow2" && n["file"].as_str() == path.to_str())
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .filter(|b| b["persistent"] == true)
        .map(|b| b["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// `qemu-io` holding a qcow2 image open for writing: QEMU marks every
/// bitmap the image holds in use at once. Killed with SIGKILL (by the
/// child's own pid) by [`InUseWriter::kill`] or when dropped, so a failing
/// test leaves no `qemu-io` behind.
pub struct InUseWriter(Child);

impl InUseWriter {
    /// Start the writer and return once `qemu-img info` shows a bitmap of
    /// `image` in use (the image needs one).
    pub fn start(image: &Path) -> InUseWriter {
        let child = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "sleep 60000"])
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io starts");
        let mut writer = InUseWriter(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !info_bitmaps(&info(image)).iter().any(|b| b.2) {
            assert!(
                Instant::now() < deadline,
                "qemu-io never marked the bitmap in use"
            );
            assert!(
                writer.0.try_wait().unwrap().is_none(),
                "qemu-io exited early"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        writer
    }

    /// SIGKILL: the bitmaps stay marked in use, as after a crashed QEMU.
    pub fn kill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for InUseWriter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Leave every bitmap `image` holds now in use: a writer opens it and is
/// killed with SIGKILL.
pub fn leave_in_use(image: &Path) {
    InUseWriter::start(image).kill();
}

/// `qemu-io` holding an image open (QEMU's write lock) until dropped.
pub struct ImageHolder(Child);

impl ImageHolder {
    /// Start `qemu-io` on `image` and return once QEMU's lock refuses a writer.
    pub fn hold(image: &Path) -> ImageHolder {
        let start = Instant::now();
        loop {
            // Read-only (`-r`): it still takes QEMU's lock against writers,
            // and a killed read-write qemu-io would leave every bitmap in
            // use.
            let mut child = Command::new("qemu-io")
                .args(["-r", "-f", "qcow2"])
                .arg(image)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("qemu-io runs");
            // Held once a writer is refused (a bitmap no image has: nothing
            // is removed either way) while qemu-io still runs. A probe that
            // held the lock just as qemu-io opened makes qemu-io exit:
            // start it again.
            loop {
                if child.try_wait().unwrap().is_some() {
                    let out = child.wait_with_output().unwrap();
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "qemu-io did not open the image: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    break;
                }
                let probe = qemu_img_output(&[
                    "bitmap",
                    "--remove",
                    image.to_str().unwrap(),
                    "ckptstore-holder-probe",
                ]);
                if String::from_utf8_lossy(&probe.stderr).contains("lock")
                    && child.try_wait().unwrap().is_none()
                {
                    return ImageHolder(child);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for ImageHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
