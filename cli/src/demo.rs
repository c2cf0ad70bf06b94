//! `ckptstore demo`: the whole story on libvirt's built-in test driver
//! (`test:///default`, inside this process, no daemon), with a throw-away
//! journal: sync a chain, sync again (nothing to do), lose libvirt's
//! metadata, start putting it back and "die" half-way, look at `status`,
//! `recover`, and check the result.
//!
//! The crash is the library's own: the agent's progress callback asks to
//! stop after the fourth redefine, and the transaction stays open exactly
//! as if the agent had been killed there. Everything is the library's
//! ordinary API.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use chrono::DateTime;
use ckptstore::{
    Backend, Chain, Checkpoint, Error, LibvirtBackend, Policy, Progress, Store, StoreOptions,
};
use serde_json::json;
use uuid::Uuid;
use virt::connect::Connect;

use super::exit::{Fail, LIBVIRT};
use super::output::{self, Out};

const URI: &str = "test:///default";
const DOMAIN: &str = "demo-vm";
const VM_UUID: &str = "5ca1ab1e-0000-4000-8000-00000000d3e0";
const CHECKPOINTS: usize = 8;
/// The injected crash: after this many redefines of the second sync.
const CRASH_AFTER: u64 = 4;

pub fn run(out: &Out) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("ckptstore-demo-")
        .tempdir()?;
    let journal = dir.path().join("journal.db");
    virt::error::clear_error_callback();
    let conn = Connect::open(Some(URI)).map_err(|e| {
        Fail::new(
            LIBVIRT,
            format!("cannot open libvirt's test driver {URI}: {e}"),
            "install libvirt's client library",
        )
    })?;
    let vm = DemoDomain::start(&conn)?;
    let backend = LibvirtBackend::connect(URI)?;
    let chain = demo_chain();
    let target = chain.clone().validate()?.defs();

    out.say(format!(
        "ckptstore demo: the whole story on libvirt's built-in test driver ({URI}), inside this\n\
         process, with a throw-away journal {}.\n",
        journal.display()
    ))?;
    out.say(format!(
        "1. A running VM, domain {DOMAIN}, has two disks, vda and vdb. Its backup system keeps\n   \
         a chain of {CHECKPOINTS} checkpoints in its own database (each one's parent is the one above it):"
    ))?;
    for c in &chain.checkpoints {
        out.say(format!(
            "     {}  {}",
            c.id,
            c.created.format("%Y-%m-%d %H:%M")
        ))?;
    }

    let store = Store::open(&journal)?;
    out.say(
        "\n2. Put the chain into libvirt, all or nothing.\n   $ ckptstore sync --chain chain.json",
    )?;
    let first = store.sync(&backend, chain.clone())?;
    out.say(indent(&output::sync_text(&first)))?;

    out.say("3. The same again: libvirt already has every checkpoint, so no libvirt call is made.\n   $ ckptstore sync --chain chain.json")?;
    let second = store.sync(&backend, chain.clone())?;
    out.say(indent(&output::sync_text(&second)))?;

    vm.restart(&conn)?;
    out.say(format!(
        "4. The VM restarts. It is a transient domain, so libvirt forgets its checkpoints:\n   \
         libvirt now has {} checkpoints for {DOMAIN}.\n",
        backend.list(DOMAIN)?.len()
    ))?;

    out.say(format!(
        "5. The host agent (this process, pid {}) puts the last committed chain back ...\n   $ ckptstore sync --domain {DOMAIN}",
        std::process::id()
    ))?;
    let crashed = crash_in_the_middle(&journal, &backend)?;
    let half = backend.list(DOMAIN)?.len();
    out.say(format!(
        "   ... and stops dead after its {CRASH_AFTER}th redefine, as if killed ({}).\n   \
         libvirt now has {half} of the {CHECKPOINTS} checkpoints: a half-done redefine loop.\n",
        if crashed {
            "its progress callback asked to stop: no further call, nothing cleaned up"
        } else {
            "it did not happen"
        }
    ))?;

    out.say("6. What the journal knows.\n   $ ckptstore status")?;
    let after_crash = store.status(None)?;
    out.say(indent(&output::status_text(&after_crash)))?;
    out.say(
        "   The intent was journaled before the first libvirt call. Its owner is this process,\n   \
         which holds no lock on the domain any more, so it can finish the transaction itself\n   \
         (after a real crash the owner shows dead, and any process may; while a process works\n   \
         on the domain, `sync` answers busy, exit 3).\n",
    )?;

    out.say("7. Recover: finish every transaction nobody is working on.\n   $ ckptstore recover")?;
    let recovered = store.recover(&backend, Policy::Resume, None)?;
    out.say(indent(&output::recover_text(&recovered)))?;
    out.say(
        "   libvirt was listed and compared by content first, so only the missing checkpoints\n   \
         were redefined. (`recover --rollback` would have restored the state before instead.)\n",
    )?;

    out.say("8. The result.\n   $ ckptstore status")?;
    let end = store.status(None)?;
    out.say(indent(&output::status_text(&end)))?;
    let now = backend.list(DOMAIN)?;
    let equal = same_content(now.clone(), target.clone());
    out.say(format!(
        "   libvirt has {} checkpoints for {DOMAIN}, equal to the chain: {}.\n",
        now.len(),
        if equal { "yes" } else { "NO" }
    ))?;
    out.say("Done. With a real daemon the same commands run against qemu:///system; see `ckptstore --help`.")?;

    if out.json() {
        let doc = json!({
            "domain": DOMAIN,
            "checkpoints": CHECKPOINTS,
            "first_sync": first,
            "second_sync": second,
            "crashed_after": if crashed { Some(CRASH_AFTER) } else { None },
            "libvirt_after_crash": half,
            "status_after_crash": after_crash,
            "recovered": recovered.recovered,
            "status": end,
            "libvirt_equals_chain": equal,
        });
        out.emit(&doc, String::new)?;
    }
    drop(vm);
    if !(crashed && equal && end.incomplete.is_empty()) {
        anyhow::bail!("the demo did not end as it should: crashed {crashed}, libvirt equals the chain {equal}");
    }
    Ok(())
}

/// Run `sync --domain` as the agent, stopping dead after the
/// [`CRASH_AFTER`]th redefine through the progress callback. True when it
/// stopped there.
fn crash_in_the_middle(
    journal: &std::path::Path,
    backend: &LibvirtBackend,
) -> anyhow::Result<bool> {
    let agent = Store::open_with(
        journal,
        StoreOptions {
            progress: Some(Arc::new(|p: &Progress| {
                if p.done == CRASH_AFTER {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })),
            ..StoreOptions::default()
        },
    )?;
    match agent.resync(backend, DOMAIN) {
        Err(Error::Aborted { .. }) => Ok(true),
        Err(e) => Err(e.into()),
        Ok(_) => Ok(false),
    }
}

/// Do two lists hold the same checkpoints with the same content, in any
/// order?
fn same_content(
    mut a: Vec<ckptstore::CheckpointDef>,
    mut b: Vec<ckptstore::CheckpointDef>,
) -> bool {
    a.sort_by(|x, y| x.name.cmp(&y.name));
    b.sort_by(|x, y| x.name.cmp(&y.name));
    a == b
}

/// The chain: a line of nightly checkpoints over both disks.
fn demo_chain() -> Chain {
    let disks = [
        Uuid::from_u128(0xd15c_0001).to_string(),
        Uuid::from_u128(0xd15c_0002).to_string(),
    ];
    let id = |i: usize| {
        Uuid::from_u128(0xc0ff_ee00_0000_0000_0000_0000_0000_0000 + i as u128).to_string()
    };
    Chain {
        scope: None,
        vm_id: Uuid::parse_str(VM_UUID).unwrap_or_default(),
        domain: Some(DOMAIN.into()),
        disks: BTreeMap::from([
            (disks[0].clone(), "vda".to_string()),
            (disks[1].clone(), "vdb".to_string()),
        ]),
        checkpoints: (1..=CHECKPOINTS)
            .map(|i| Checkpoint {
                id: id(i),
                parent: (i > 1).then(|| id(i - 1)),
                created: DateTime::from_timestamp(1_714_528_800 + (i as i64 - 1) * 86_400, 0)
                    .unwrap_or_default(),
                description: Some(format!("nightly backup {i}")),
                disks: disks.to_vec(),
            })
            .collect(),
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

/// The demo's transient, running domain (the test driver accepts
/// checkpoints only on running domains); destroyed, and so gone, on drop.
struct DemoDomain {
    conn: Connect,
}

impl DemoDomain {
    fn xml() -> String {
        let disk = |t: &str| {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='/var/lib/ckptstore-demo/{t}.qcow2'/><target dev='{t}' bus='virtio'/></disk>"
            )
        };
        format!(
            "<domain type='test'><name>{DOMAIN}</name><uuid>{VM_UUID}</uuid><memory unit='MiB'>64</memory>\
             <vcpu>1</vcpu><os><type>hvm</type></os><devices>{}{}</devices></domain>",
            disk("vda"),
            disk("vdb")
        )
    }

    fn start(conn: &Connect) -> anyhow::Result<DemoDomain> {
        conn.create_domain_xml(&Self::xml(), 0).map_err(|e| {
            Fail::new(
                LIBVIRT,
                format!("cannot start the demo domain: {e}"),
                "check libvirt's test driver",
            )
        })?;
        Ok(DemoDomain { conn: conn.clone() })
    }

    /// Destroy and create again: a transient domain comes back without
    /// checkpoint metadata.
    fn restart(&self, conn: &Connect) -> anyhow::Result<()> {
        self.destroy();
        conn.create_domain_xml(&Self::xml(), 0).map_err(|e| {
            Fail::new(
                LIBVIRT,
                format!("cannot restart the demo domain: {e}"),
                "check libvirt's test driver",
            )
        })?;
        Ok(())
    }

    fn destroy(&self) {
        if let Ok(dom) = self.conn.lookup_domain_by_name(DOMAIN) {
            let _ = dom.destroy();
        }
    }
}

impl Drop for DemoDomain {
    fn drop(&mut self) {
        self.destroy();
    }
}
