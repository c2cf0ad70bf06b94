//! One set of behaviour tests, run against every backend: the in-memory
//! [`FakeBackend`], libvirt's in-process test driver (`test:///default`) and
//! the real daemon (`qemu:///system`, shut-off domains on real qcow2
//! images, running TCG domains where a behaviour needs one).
//!
//! Each behaviour is written once, as a function of a [`Harness`]; the
//! `conformance!` macro at the bottom runs each one on the three backends.
//! Expected values are written out in full, so a difference between the
//! fake and libvirt fails the fake's test or libvirt's: every such
//! difference is a bug in the fake.

use testkit::support;

use std::collections::BTreeMap;

use ckptstore::testing::render_checkpoint;
use ckptstore::testing::xml_safe_text;
use ckptstore::FakeBackend;
use ckptstore::{Backend, BackendError, BackendErrorKind as K, CheckpointDef, LibvirtBackend};
use support::TestDomain;

/// A fresh domain on one backend; dropping it removes it.
struct Dom {
    name: String,
    uuid: String,
    targets: Vec<String>,
    guard: Option<TestDomain>,
}

/// What a behaviour needs from a backend besides the [`Backend`] trait.
trait Harness {
    /// The backend under test.
    fn backend(&self) -> &dyn Backend;

    /// A fresh domain with `disks` disks (`vda`, `vdb`, ...), each image
    /// holding `bitmaps`, in the state in which the driver redefines
    /// (shut off where it can; the test driver needs it running).
    fn domain(&self, tag: &str, disks: usize, bitmaps: &[&str]) -> Dom;

    /// A fresh *running* domain, as [`Harness::domain`].
    fn running_domain(&self, tag: &str, disks: usize, bitmaps: &[&str]) -> Dom;

    /// Whether [`Harness::domain`] gives running domains.
    fn domains_run(&self) -> bool;

    /// Create a real (non-redefine) checkpoint on a running domain, as a
    /// backup does; returns the parent libvirt gave it.
    fn create(&self, dom: &Dom, name: &str) -> Result<Option<String>, BackendError>;

    /// The hidden current checkpoint, where the harness can read it
    /// directly (the fake); `None` where only [`Harness::create`] shows it.
    #[allow(clippy::option_option)] // outer: can the harness read it; inner: is there one
    fn current(&self, dom: &Dom) -> Option<Option<String>>;

    /// Whether the driver knows REDEFINE_VALIDATE.
    fn validates(&self) -> bool;

    /// The bitmap names in each disk's image, where images exist (not on
    /// the test driver).
    fn image_bitmaps(&self, dom: &Dom) -> Option<Vec<Vec<String>>>;
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct FakeHarness {
    fake: FakeBackend,
}

impl FakeHarness {
    fn new() -> Self {
        FakeHarness {
            fake: FakeBackend::new(),
        }
    }

    fn define(&self, tag: &str, disks: usize, bitmaps: &[&str], running: bool) -> Dom {
        let name = support::unique_name(tag);
        let uuid = uuid::Uuid::new_v4().to_string();
        let targets = support::targets(disks);
        let t: Vec<&str> = targets.iter().map(String::as_str).collect();
        self.fake.define_domain(&name, &uuid, &t, running);
        for target in &t {
            for b in bitmaps {
                self.fake.add_bitmap(&name, target, b);
            }
        }
        Dom {
            name,
            uuid,
            targets,
            guard: None,
        }
    }
}

impl Harness for FakeHarness {
    fn backend(&self) -> &dyn Backend {
        &self.fake
    }
    fn domain(&self, tag: &str, disks: usize, bitmaps: &[&str]) -> Dom {
        self.define(tag, disks, bitmaps, false)
    }
    fn running_domain(&self, tag: &str, disks: usize, bitmaps: &[&str]) -> Dom {
        self.define(tag, disks, bitmaps, true)
    }
    fn domains_run(&self) -> bool {
        false
    }
    fn create(&self, dom: &Dom, name: &str) -> Result<Option<String>, BackendError> {
        self.fake.create(&dom.name, name, now())
    }
    fn current(&self, dom: &Dom) -> Option<Option<String>> {
        Some(self.fake.current(&dom.name))
    }
    fn validates(&self) -> bool {
        true
    }
    fn image_bitmaps(&self, dom: &Dom) -> Option<Vec<Vec<String>>> {
        Some(
            dom.targets
                .iter()
                .map(|t| self.fake.bitmaps(&dom.name, t))
                .collect(),
        )
    }
}

/// A harness over a real libvirt connection.
struct LibvirtHarness {
    backend: LibvirtBackend,
    conn: virt::connect::Connect,
    /// The test driver redefines only on running domains.
    always_running: bool,
}

impl LibvirtHarness {
    fn test_driver() -> Self {
        LibvirtHarness {
            backend: LibvirtBackend::connect(support::TEST_URI).unwrap(),
            conn: support::test_driver(),
            always_running: true,
        }
    }

    fn system() -> Self {
        let conn = support::system();
        LibvirtHarness {
            backend: LibvirtBackend::connect(support::SYSTEM_URI).unwrap(),
            conn,
            always_running: false,
        }
    }

    fn define(&self, tag: &str, disks: usize, bitmaps: &[&str], running: bool) -> Dom {
        let d = TestDomain::define(&self.conn, tag, disks);
        for b in bitmaps {
            d.add_bitmap_everywhere(b);
        }
        if running {
            d.start();
        }
        Dom {
            name: d.name.clone(),
            uuid: d.uuid.clone(),
            targets: d.targets.clone(),
            guard: Some(d),
        }
    }
}

impl Harness for LibvirtHarness {
    fn backend(&self) -> &dyn Backend {
        &self.backend
    }
    fn domain(&self, tag: &str, disks: usize, bitmaps: &[&str]) -> Dom {
        self.define(tag, disks, bitmaps, self.always_running)
    }
    fn running_domain(&self, tag: &str, disks: usize, bitmaps: &[&str]) -> Dom {
        self.define(tag, disks, bitmaps, true)
    }
    fn domains_run(&self) -> bool {
        self.always_running
    }
    fn create(&self, dom: &Dom, name: &str) -> Result<Option<String>, BackendError> {
        let xml = format!("<domaincheckpoint><name>{name}</name></domaincheckpoint>");
        let def = self.backend.create_checkpoint(&dom.name, &xml)?;
        assert_eq!(def.name, name);
        Ok(def.parent)
    }
    fn current(&self, _dom: &Dom) -> Option<Option<String>> {
        None
    }
    fn validates(&self) -> bool {
        !self.always_running
    }
    fn image_bitmaps(&self, dom: &Dom) -> Option<Vec<Vec<String>>> {
        let guard = dom.guard.as_ref().filter(|_| !self.always_running)?;
        let running = self.backend.domain_info(&dom.name).unwrap().running;
        Some(
            guard
                .images
                .iter()
                .map(|p| {
                    if running {
                        return testkit::qemu::running_bitmaps(support::SYSTEM_URI, &dom.name, p);
                    }
                    let mut names: Vec<String> =
                        testkit::qemu::info_bitmaps(&testkit::qemu::info(p))
                            .into_iter()
                            .map(|b| b.0)
                            .collect();
                    names.sort();
                    names
                })
                .collect(),
        )
    }
}

// ---------------------------------------------------------------------------
// Helpers

/// A checkpoint whose bitmap on each disk is named after it.
fn def(name: &str, parent: Option<&str>, time: i64, disks: &[&str]) -> CheckpointDef {
    CheckpointDef {
        name: name.into(),
        parent: parent.map(Into::into),
        creation_time: time,
        description: None,
        disks: disks
            .iter()
            .map(|d| (d.to_string(), name.to_string()))
            .collect(),
    }
}

/// Redefine through the XML the store renders.
fn put(h: &dyn Harness, dom: &Dom, d: &CheckpointDef) -> Result<(), BackendError> {
    h.backend()
        .redefine(&dom.name, &render_checkpoint(d), false)
}

fn put_ok(h: &dyn Harness, dom: &Dom, d: &CheckpointDef) {
    put(h, dom, d)
        .unwrap_or_else(|e| panic!("redefine {} on {}: {e:?}", d.name, h.backend().describe()));
}

/// `(name, parent)` in listing order.
fn tree(h: &dyn Harness, dom: &Dom) -> Vec<(String, Option<String>)> {
    h.backend()
        .list(&dom.name)
        .unwrap()
        .into_iter()
        .map(|d| (d.name, d.parent))
        .collect()
}

fn t(pairs: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
    pairs
        .iter()
        .map(|(n, p)| (n.to_string(), p.map(Into::into)))
        .collect()
}

fn assert_err(r: Result<(), BackendError>, kind: K, code: i32, message: Option<&str>) {
    let e = r.expect_err("libvirt must refuse this");
    assert_eq!((e.kind, e.code), (kind, code), "{e:?}");
    if let Some(m) = message {
        assert_eq!(e.message, m);
    }
}

fn assert_parents_first(list: &[(String, Option<String>)]) {
    for (i, (name, parent)) in list.iter().enumerate() {
        if let Some(p) = parent {
            let at = list.iter().position(|(n, _)| n == p);
            assert!(
                at.is_some_and(|at| at < i),
                "{name} listed before its parent {p}: {list:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Behaviours

fn child_before_parent_is_refused(h: &dyn Harness) {
    let dom = h.domain("orphan", 1, &[]);
    assert_err(
        put(h, &dom, &def("c2", Some("c1"), 200, &["vda"])),
        K::InvalidArgument,
        8,
        Some("invalid argument: parent c1 for moment c2 not found"),
    );
    assert_eq!(tree(h, &dom), t(&[]));
    put_ok(h, &dom, &def("c1", None, 100, &["vda"]));
    put_ok(h, &dom, &def("c2", Some("c1"), 200, &["vda"]));
    assert_eq!(tree(h, &dom), t(&[("c1", None), ("c2", Some("c1"))]));
}

fn redefining_a_name_replaces_it(h: &dyn Harness) {
    let dom = h.domain("replace", 2, &[]);
    put_ok(h, &dom, &def("c1", None, 100, &["vda"]));
    put_ok(h, &dom, &def("c2", Some("c1"), 200, &["vda"]));
    put_ok(h, &dom, &def("c3", Some("c2"), 300, &["vda"]));
    put_ok(h, &dom, &def("r2", None, 50, &["vdb"]));
    // Same name, another parent, time, description and disk map: replaced
    // silently, its child kept.
    let mut new = def("c2", Some("r2"), 999, &["vda", "vdb"]);
    new.description = Some("moved".into());
    new.disks.insert("vdb".into(), "other-bitmap".into());
    put_ok(h, &dom, &new);
    let list = h.backend().list(&dom.name).unwrap();
    let got: BTreeMap<_, _> = list.iter().map(|d| (d.name.as_str(), d)).collect();
    assert_eq!(got["c2"], &new);
    assert_eq!(got["c3"].parent.as_deref(), Some("c2"));
    assert_eq!(
        tree(h, &dom),
        t(&[
            ("r2", None),
            ("c2", Some("r2")),
            ("c3", Some("c2")),
            ("c1", None)
        ])
    );
    // Idempotent: the same definition again changes nothing.
    put_ok(h, &dom, &new);
    assert_eq!(h.backend().list(&dom.name).unwrap(), list);
    // Back to a root.
    put_ok(h, &dom, &def("c2", None, 200, &["vda"]));
    assert_eq!(
        tree(h, &dom),
        t(&[("c2", None), ("c3", Some("c2")), ("r2", None), ("c1", None)])
    );
}

fn delete_reparents_the_children(h: &dyn Harness) {
    let dom = h.domain("delete", 1, &[]);
    for d in [
        def("c1", None, 100, &["vda"]),
        def("c2", Some("c1"), 200, &["vda"]),
        def("c3", Some("c2"), 300, &["vda"]),
        def("c4", Some("c2"), 400, &["vda"]),
        def("c5", Some("c1"), 500, &["vda"]),
    ] {
        put_ok(h, &dom, &d);
    }
    assert_eq!(
        tree(h, &dom),
        t(&[
            ("c1", None),
            ("c5", Some("c1")),
            ("c2", Some("c1")),
            ("c4", Some("c2")),
            ("c3", Some("c2"))
        ])
    );
    h.backend().delete(&dom.name, "c2").unwrap();
    // The children move, in their order, in front of their new siblings.
    assert_eq!(
        tree(h, &dom),
        t(&[
            ("c1", None),
            ("c4", Some("c1")),
            ("c3", Some("c1")),
            ("c5", Some("c1"))
        ])
    );
    h.backend().delete(&dom.name, "c1").unwrap();
    assert_eq!(
        tree(h, &dom),
        t(&[("c4", None), ("c3", None), ("c5", None)])
    );
    // The definitions of the moved children say so too.
    let c4 = h.backend().list(&dom.name).unwrap().remove(0);
    assert_eq!(c4, def("c4", None, 400, &["vda"]));
}

fn deleting_an_unknown_name_is_no_checkpoint(h: &dyn Harness) {
    let dom = h.domain("nockpt", 1, &[]);
    assert_err(
        h.backend().delete(&dom.name, "nope"),
        K::NoCheckpoint,
        103,
        Some("Domain checkpoint not found: no domain checkpoint with matching name 'nope'"),
    );
    put_ok(h, &dom, &def("c1", None, 100, &["vda"]));
    h.backend().delete(&dom.name, "c1").unwrap();
    assert_err(
        h.backend().delete(&dom.name, "c1"),
        K::NoCheckpoint,
        103,
        None,
    );
}

fn an_unknown_domain_is_no_domain(h: &dyn Harness) {
    let b = h.backend();
    let missing = support::unique_name("missing");
    let check = |e: BackendError| {
        assert_eq!((e.kind, e.code), (K::NoDomain, 42), "{e:?}");
        assert!(e.message.starts_with("Domain not found"), "{e:?}");
        assert!(e.is_unreachable());
    };
    check(b.list(&missing).unwrap_err());
    check(
        b.redefine(
            &missing,
            &render_checkpoint(&def("c1", None, 1, &["vda"])),
            false,
        )
        .unwrap_err(),
    );
    check(b.delete(&missing, "c1").unwrap_err());
    check(b.domain_info(&missing).unwrap_err());
    check(b.list(&uuid::Uuid::new_v4().to_string()).unwrap_err());
}

fn self_parents_and_cycles_are_refused(h: &dyn Harness) {
    let dom = h.domain("cycle", 1, &[]);
    put_ok(h, &dom, &def("c1", None, 100, &["vda"]));
    put_ok(h, &dom, &def("c2", Some("c1"), 200, &["vda"]));
    put_ok(h, &dom, &def("c3", Some("c2"), 300, &["vda"]));
    let before = tree(h, &dom);
    assert_err(
        put(h, &dom, &def("c4", Some("c4"), 400, &["vda"])),
        K::InvalidArgument,
        8,
        Some("invalid argument: cannot set moment c4 as its own parent"),
    );
    assert_err(
        put(h, &dom, &def("c2", Some("c2"), 200, &["vda"])),
        K::InvalidArgument,
        8,
        Some("invalid argument: cannot set moment c2 as its own parent"),
    );
    // libvirt names the ancestor whose parent is the checkpoint redefined.
    assert_err(
        put(h, &dom, &def("c1", Some("c3"), 100, &["vda"])),
        K::InvalidArgument,
        8,
        Some("invalid argument: parent c2 would create cycle to c1"),
    );
    assert_err(
        put(h, &dom, &def("c1", Some("c2"), 100, &["vda"])),
        K::InvalidArgument,
        8,
        Some("invalid argument: parent c2 would create cycle to c1"),
    );
    assert_eq!(tree(h, &dom), before);
}

fn listing_is_libvirts_topological_order(h: &dyn Harness) {
    let dom = h.domain("order", 1, &[]);
    for d in [
        def("r", None, 100, &["vda"]),
        def("b", Some("r"), 300, &["vda"]),
        def("a", Some("r"), 200, &["vda"]),
        def("c", Some("r"), 150, &["vda"]),
        def("a1", Some("a"), 400, &["vda"]),
        def("z", None, 50, &["vda"]),
    ] {
        put_ok(h, &dom, &d);
    }
    // Depth first; siblings (roots too) most recently defined first,
    // whatever their names or creation times.
    let expected = t(&[
        ("z", None),
        ("r", None),
        ("c", Some("r")),
        ("a", Some("r")),
        ("a1", Some("a")),
        ("b", Some("r")),
    ]);
    assert_eq!(tree(h, &dom), expected);
    assert_parents_first(&expected);
    // A redefine, even an identical one, moves the checkpoint to the front.
    put_ok(h, &dom, &def("b", Some("r"), 300, &["vda"]));
    assert_eq!(
        tree(h, &dom),
        t(&[
            ("z", None),
            ("r", None),
            ("b", Some("r")),
            ("c", Some("r")),
            ("a", Some("r")),
            ("a1", Some("a"))
        ])
    );
}

fn rendered_xml_round_trips(h: &dyn Harness) {
    let dom = h.domain("roundtrip", 2, &[]);
    let described = |name: &str, parent: Option<&str>, text: &str| {
        let mut d = def(name, parent, 1_700_000_000, &["vda", "vdb"]);
        d.description = Some(xml_safe_text(text));
        d
    };
    let mut defs = vec![
        described(
            "meta",
            None,
            "a <b> & ]]> 'q' \"d\" <domain type='kvm'><name>x</name></domain> &amp; <![CDATA[x]]>",
        ),
        described("spaces", Some("meta"), "  leading and trailing  "),
        described("lines", Some("spaces"), "\nfirst\n\n  second\t\n"),
        described("blank", Some("lines"), "   "),
        described("crlf", Some("blank"), "one\r\ntwo\rthree"),
        described("unicode", Some("crlf"), "Ünïcødé ✓ 日本語 \u{1F600}"),
        described("control", Some("unicode"), "bell\u{7} nul\u{0} esc\u{1b}"),
        def("epoch", Some("control"), 0, &["vda"]),
        def("far", Some("epoch"), 4_102_444_800, &["vdb"]),
    ];
    // A bitmap that is not named after the checkpoint, and a disk that
    // takes no part.
    defs[8]
        .disks
        .insert("vda".into(), "some.other_bitmap-1".into());
    for d in &defs {
        put_ok(h, &dom, d);
    }
    assert_eq!(defs[4].description.as_deref(), Some("one\ntwo\nthree"));
    assert_eq!(h.backend().list(&dom.name).unwrap(), defs);

    // What the store never renders but libvirt still reads the same way.
    let b = h.backend();
    let raw = "<domaincheckpoint><name>raw</name><description>x\r\ny</description><creationTime>5</creationTime>\
               <disks><disk name='vda'/><disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>";
    b.redefine(&dom.name, raw, false).unwrap();
    let mut expected = def("raw", None, 5, &["vda"]);
    expected.description = Some("x\ny".into());
    assert_eq!(b.list(&dom.name).unwrap()[0], expected);
    // An empty description is no description.
    let mut empty = def("empty", None, 6, &["vda"]);
    b.redefine(
        &dom.name,
        &render_checkpoint(&empty).replace(
            "<creationTime>",
            "<description></description><creationTime>",
        ),
        false,
    )
    .unwrap();
    empty.description = Some(String::new());
    assert!(!render_checkpoint(&empty).contains("description"));
    empty.description = None;
    assert_eq!(b.list(&dom.name).unwrap()[0], empty);
}

fn disks_the_domain_lacks_are_accepted(h: &dyn Harness) {
    let dom = h.domain("nodisk", 1, &[]);
    assert_eq!(dom.targets, vec!["vda"]);
    let d = def("c1", None, 100, &["vda", "vdz", "sdq"]);
    put_ok(h, &dom, &d);
    assert_eq!(h.backend().list(&dom.name).unwrap(), vec![d]);
}

fn schema_refusals(h: &dyn Harness) {
    let dom = h.domain("schema", 1, &[]);
    let b = h.backend();
    put_ok(h, &dom, &def("c1", None, 100, &["vda"]));
    let good = render_checkpoint(&def("c2", Some("c1"), 200, &["vda"]));
    let schema = |xml: String| {
        assert_err(
            b.redefine(&dom.name, &xml, false),
            K::InvalidArgument,
            92,
            None,
        );
    };
    schema(good.replace("<name>c2</name>", "<name>.c2</name>"));
    schema(good.replace("<name>c2</name>", "<name>c/2</name>"));
    schema(good.replace("<name>c1</name>", "<name>c 1</name>"));
    schema(good.replace("<creationTime>200", "<creationTime>-200"));
    schema(good.replace("name=\"vda\"", "name=\"disk0\""));
    schema(good.replace(
        "<disk name=\"vda\" checkpoint=\"bitmap\" bitmap=\"c2\"/>",
        "",
    ));
    schema(good.replace("<name>c2</name>", "<name>c2</name><unknown/>"));
    assert_err(
        b.redefine(
            &dom.name,
            &good.replace("<creationTime>200</creationTime>", ""),
            false,
        ),
        K::Other,
        1,
        Some("internal error: missing creationTime from existing checkpoint"),
    );
    // Not well-formed: VIR_ERR_XML_DETAIL.
    assert_err(
        b.redefine(&dom.name, "<domaincheckpoint><name>c2</name>", false),
        K::InvalidArgument,
        35,
        None,
    );
    assert_err(
        b.redefine(&dom.name, &good.replace("c2", "c\u{1}2"), false),
        K::InvalidArgument,
        35,
        None,
    );
    assert_eq!(tree(h, &dom), t(&[("c1", None)]));
}

fn domain_info_names_disks_and_state(h: &dyn Harness) {
    let dom = h.domain("info", 3, &[]);
    for key in [&dom.name, &dom.uuid, &dom.uuid.to_uppercase()] {
        let info = h.backend().domain_info(key).unwrap();
        assert_eq!(
            (info.name.as_str(), info.uuid.as_str()),
            (dom.name.as_str(), dom.uuid.as_str())
        );
        assert_eq!(info.running, h.domains_run());
        let targets: Vec<&str> = info.disks.iter().map(|d| d.target.as_str()).collect();
        assert_eq!(targets, ["vda", "vdb", "vdc"]);
        assert!(info
            .disks
            .iter()
            .all(|d| d.format.as_deref() == Some("qcow2") && d.source.is_some()));
    }
    // Checkpoint calls take the UUID too.
    put_ok(h, &dom, &def("c1", None, 100, &["vda"]));
    assert_eq!(h.backend().list(&dom.uuid).unwrap().len(), 1);
}

fn the_hidden_current_checkpoint(h: &dyn Harness) {
    let dom = h.running_domain("current", 1, &[]);
    let cur = |expected: Option<&str>| {
        if let Some(c) = h.current(&dom) {
            assert_eq!(c.as_deref(), expected);
        }
    };
    // The first redefined checkpoint becomes current, then any whose
    // parent is the current one; a new root does not.
    put_ok(h, &dom, &def("c1", None, 100, &["vda"]));
    cur(Some("c1"));
    put_ok(h, &dom, &def("c2", Some("c1"), 200, &["vda"]));
    put_ok(h, &dom, &def("c3", None, 300, &["vda"]));
    put_ok(h, &dom, &def("side", Some("c1"), 250, &["vda"]));
    cur(Some("c2"));
    // A new checkpoint takes the current one as its parent and becomes current.
    assert_eq!(h.create(&dom, "x").unwrap().as_deref(), Some("c2"));
    cur(Some("x"));
    put_ok(h, &dom, &def("c4", Some("x"), 400, &["vda"]));
    cur(Some("c4"));
    // Replacing the current checkpoint, even under a parent that is not
    // current, leaves it current.
    put_ok(h, &dom, &def("c4", Some("c3"), 401, &["vda"]));
    cur(Some("c4"));
    assert_eq!(h.create(&dom, "y").unwrap().as_deref(), Some("c4"));
    h.backend().delete(&dom.name, "y").unwrap();
    // ...also as a root: how the planner makes a new root current.
    put_ok(h, &dom, &def("c4", None, 402, &["vda"]));
    cur(Some("c4"));
    assert_eq!(h.create(&dom, "y2").unwrap().as_deref(), Some("c4"));
    put_ok(h, &dom, &def("c4", Some("c3"), 401, &["vda"]));
    // Deleting the current checkpoint makes its parent current.
    h.backend().delete(&dom.name, "y2").unwrap();
    cur(Some("c4"));
    assert_eq!(h.create(&dom, "z").unwrap().as_deref(), Some("c4"));
    // Deleting another checkpoint does not move it; deleting a current root
    // leaves none, and the next redefine becomes current again.
    h.backend().delete(&dom.name, "c3").unwrap();
    h.backend().delete(&dom.name, "z").unwrap();
    cur(Some("c4"));
    h.backend().delete(&dom.name, "c4").unwrap();
    cur(None);
    put_ok(h, &dom, &def("c5", Some("x"), 500, &["vda"]));
    cur(Some("c5"));
    assert_eq!(h.create(&dom, "w").unwrap().as_deref(), Some("c5"));
    // A real checkpoint covers every disk, with a bitmap named after it.
    let w = h
        .backend()
        .list(&dom.name)
        .unwrap()
        .into_iter()
        .find(|d| d.name == "w")
        .unwrap();
    assert_eq!(
        w.disks,
        BTreeMap::from([("vda".to_string(), "w".to_string())])
    );
}

fn creating_needs_a_running_domain(h: &dyn Harness) {
    if h.domains_run() {
        return;
    }
    let dom = h.domain("create-off", 1, &[]);
    let e = h.create(&dom, "x").unwrap_err();
    assert_eq!((e.kind, e.code), (K::Unsupported, 84), "{e:?}");
    assert_eq!(
        e.message,
        "Operation not supported: cannot create checkpoint for inactive domain"
    );
}

fn validate_checks_the_bitmaps_of_a_running_domain(h: &dyn Harness) {
    let b = h.backend();
    if !h.validates() {
        let dom = h.domain("novalidate", 1, &[]);
        let e = b
            .redefine(
                &dom.name,
                &render_checkpoint(&def("c1", None, 1, &["vda"])),
                true,
            )
            .unwrap_err();
        assert_eq!(e.kind, K::Unsupported, "{e:?}");
        return;
    }
    let off = h.domain("validate-off", 1, &["c1"]);
    let validate =
        |dom: &Dom, d: &CheckpointDef| b.redefine(&dom.name, &render_checkpoint(d), true);
    // The parent is checked before the run state.
    assert_err(
        validate(&off, &def("c2", Some("c1"), 2, &["vda"])),
        K::InvalidArgument,
        8,
        None,
    );
    assert_err(
        validate(&off, &def("c1", None, 1, &["vda"])),
        K::NotRunning,
        55,
        Some("Requested operation is not valid: domain is not running"),
    );
    assert_eq!(tree(h, &off), t(&[]));

    let on = h.running_domain("validate-on", 2, &["c1"]);
    validate(&on, &def("c1", None, 1, &["vda", "vdb"])).unwrap();
    assert_err(
        validate(&on, &def("c2", Some("c1"), 2, &["vda"])),
        K::Inconsistent,
        109,
        Some("checkpoint inconsistent: missing or broken bitmap 'c2' for disk 'vda'"),
    );
    // libvirt looks for the bitmap named after the checkpoint, whatever the
    // XML's bitmap attribute says...
    let mut renamed = def("c3", Some("c1"), 3, &["vda"]);
    renamed.disks.insert("vda".into(), "c1".into());
    assert_err(validate(&on, &renamed), K::Inconsistent, 109, None);
    // ...and skips disks the domain does not have.
    validate(&on, &def("c4", Some("c1"), 4, &["vdz"])).unwrap();
    assert_eq!(tree(h, &on), t(&[("c1", None), ("c4", Some("c1"))]));
}

/// The per-disk check of a running domain ([`Backend::bitmap_states`],
/// libvirt's checkpoint XML with `VIR_DOMAIN_CHECKPOINT_XML_SIZE`): every
/// disk's verdict where `REDEFINE_VALIDATE` stops at the first bad one, the
/// bitmap named after the checkpoint, disks the domain lacks skipped,
/// nothing redefined. And [`Backend::checkpoint_xml`] reads back what was
/// defined.
fn bitmap_states_cover_every_disk_of_a_running_domain(h: &dyn Harness) {
    use ckptstore::BitmapState;
    let b = h.backend();
    let states = |dom: &Dom, name: &str| -> Result<Vec<(String, &'static str)>, BackendError> {
        Ok(b.bitmap_states(&dom.name, name)?
            .into_iter()
            .map(|d| {
                let s = match d.state {
                    BitmapState::Usable { .. } => "usable",
                    _ => "unusable",
                };
                (d.target, s)
            })
            .collect())
    };
    if !h.validates() {
        let dom = h.domain("states-none", 1, &[]);
        put_ok(h, &dom, &def("c1", None, 1, &["vda"]));
        let e = states(&dom, "c1").unwrap_err();
        assert_eq!(e.kind, K::Unsupported, "{e:?}");
        return;
    }
    let off = h.domain("states-off", 1, &["c1"]);
    put_ok(h, &off, &def("c1", None, 1, &["vda"]));
    let e = states(&off, "c1").unwrap_err();
    assert_eq!((e.kind, e.code), (K::NotRunning, 55), "{e:?}");
    assert_eq!(
        e.message,
        "Requested operation is not valid: domain is not running"
    );

    let on = h.running_domain("states-on", 2, &["c1"]);
    let mut renamed = def("c3", Some("c2"), 3, &["vda"]);
    renamed.disks.insert("vda".into(), "c1".into());
    let defs = [
        def("c1", None, 1, &["vda", "vdb"]),
        def("c2", Some("c1"), 2, &["vda", "vdb"]),
        renamed,
        def("c4", Some("c3"), 4, &["vdb", "vdz"]),
    ];
    for d in &defs {
        put_ok(h, &on, d);
    }
    let before = b.list(&on.name).unwrap();
    let v = |t: &str, s: &'static str| (t.to_string(), s);
    assert_eq!(
        states(&on, "c1").unwrap(),
        [v("vda", "usable"), v("vdb", "usable")]
    );
    assert_eq!(
        states(&on, "c2").unwrap(),
        [v("vda", "unusable"), v("vdb", "unusable")]
    );
    // The bitmap named after the checkpoint, whatever the XML says.
    assert_eq!(states(&on, "c3").unwrap(), [v("vda", "unusable")]);
    assert_eq!(states(&on, "c4").unwrap(), [v("vdb", "unusable")]);
    let e = states(&on, "c9").unwrap_err();
    assert_eq!((e.kind, e.code), (K::NoCheckpoint, 103), "{e:?}");
    assert_eq!(b.list(&on.name).unwrap(), before);
    for d in &defs {
        let xml = b.checkpoint_xml(&on.name, &d.name).unwrap();
        assert_eq!(&ckptstore::testing::parse_checkpoint(&xml).unwrap(), d);
    }
    let e = b.checkpoint_xml(&on.name, "c9").unwrap_err();
    assert_eq!((e.kind, e.code), (K::NoCheckpoint, 103), "{e:?}");
}

/// A checkpoint with no bitmap on any disk, as `checkpoint-create-as D
/// --diskspec vda,checkpoint=no` makes on a one-disk domain: libvirt dumps
/// it with every disk `checkpoint='no'`, which reads as no disks. The store
/// must be able to redefine it again (a re-apply, a rollback, `validate`).
fn a_checkpoint_without_bitmap_disks(h: &dyn Harness) {
    let dom = h.domain("nobitmap", 1, &[]);
    let b = h.backend();
    let dumped = "<domaincheckpoint>\n  <name>k1</name>\n  <creationTime>100</creationTime>\n  <disks>\n    \
                  <disk name='vda' checkpoint='no'/>\n  </disks>\n</domaincheckpoint>\n";
    b.redefine(&dom.name, dumped, false).unwrap();
    let listed = b.list(&dom.name).unwrap();
    assert_eq!(listed, vec![def("k1", None, 100, &[])]);
    // As the store renders it: accepted, and listed with the same content.
    put_ok(h, &dom, &listed[0]);
    assert_eq!(b.list(&dom.name).unwrap(), listed);
    put_ok(h, &dom, &def("k2", Some("k1"), 200, &["vda"]));
    put_ok(h, &dom, &def("k3", Some("k2"), 300, &[]));
    assert_eq!(
        b.list(&dom.name).unwrap(),
        vec![
            def("k1", None, 100, &[]),
            def("k2", Some("k1"), 200, &["vda"]),
            def("k3", Some("k2"), 300, &[])
        ]
    );
    // What libvirt's schema refuses is an empty <disks> element.
    assert_err(
        b.redefine(
            &dom.name,
            "<domaincheckpoint><name>k4</name><creationTime>400</creationTime><disks></disks></domaincheckpoint>",
            false,
        ),
        K::InvalidArgument,
        92,
        None,
    );
    assert_eq!(b.list(&dom.name).unwrap().len(), 3);
}

/// libvirt's own test files (`tests/data/libvirt-checkpoints/`, from
/// libvirt's `tests/qemudomaincheckpointxml2xml{in,out}/`), redefined as
/// they are and as the store renders them.
fn libvirts_own_checkpoint_files(h: &dyn Harness) {
    let dom = h.domain("lvfiles", 2, &[]);
    let b = h.backend();
    let redefine = |xml: &str| b.redefine(&dom.name, xml, false);
    let listed = |name: &str| {
        b.list(&dom.name)
            .unwrap()
            .into_iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("{name} is not listed"))
    };
    // The parent the files name.
    put_ok(h, &dom, &def("1525111885", None, 1_525_111_885, &["vda"]));
    for (file, want) in libvirt_files() {
        let xml = libvirt_file(file);
        let ctx = format!("{file} on {}", b.describe());
        match file {
            // Checkpoints libvirt formatted: redefined as they are.
            "out/disk-default.xml" | "out/empty.xml" | "out/sample.xml" | "out/size.xml" => {
                let want = want.clone().unwrap();
                redefine(&xml).unwrap_or_else(|e| panic!("{ctx}: {e:?}"));
                assert_eq!(listed(&want.name), want, "{ctx}");
            }
            // It embeds its domain, whose UUID must be this domain's.
            "out/redefine.xml" => {
                let want = want.clone().unwrap();
                assert_err(
                    redefine(&xml),
                    K::InvalidArgument,
                    8,
                    Some(&format!(
                        "invalid argument: definition for checkpoint c1 must use uuid {}",
                        dom.uuid
                    )),
                );
                redefine(&xml.replace("c7a5fdbd-edaf-9455-926a-d65c16db1809", &dom.uuid))
                    .unwrap_or_else(|e| panic!("{ctx}: {e:?}"));
                assert_eq!(listed("c1"), want, "{ctx}");
            }
            // libvirt's internal format: <active> is not in the public schema.
            "out/internal-active-invalid.xml" | "out/internal-inactive-invalid.xml" => {
                assert_err(redefine(&xml), K::InvalidArgument, 92, None);
            }
            // Creation documents: no name, no creation time, bad names.
            "in/disk-default.xml" | "in/empty.xml" | "in/sample.xml" => assert_err(
                redefine(&xml),
                K::InvalidArgument,
                27,
                Some("XML error: a redefined checkpoint must have a name"),
            ),
            "in/disk-invalid.xml" | "in/name-invalid.xml" => {
                assert_err(redefine(&xml), K::InvalidArgument, 92, None);
            }
            "in/size.xml" => assert_err(
                redefine(&xml),
                K::Other,
                1,
                Some("internal error: missing creationTime from existing checkpoint"),
            ),
            other => panic!("no expectation for {other}"),
        }
        // Whatever the file, what the store renders from what it reads is
        // accepted where the name is one libvirt takes, and lists the same.
        if let Some(want) = want.filter(|w| ckptstore::testing::is_valid_checkpoint_name(&w.name)) {
            put(h, &dom, &want).unwrap_or_else(|e| panic!("{ctx}, rendered: {e:?}"));
            assert_eq!(listed(&want.name), want, "{ctx}, rendered");
        }
    }
}

macro_rules! conformance {
    ($($behaviour:ident),* $(,)?) => {
        mod fake {
            $(#[test]
            fn $behaviour() {
                super::$behaviour(&super::FakeHarness::new());
            })*
        }
        mod test_driver {
            $(#[test]
            fn $behaviour() {
                super::$behaviour(&super::LibvirtHarness::test_driver());
            })*
        }
        mod qemu_system {
            $(#[test]
            fn $behaviour() {
                super::$behaviour(&super::LibvirtHarness::system());
            })*
        }
    };
}

conformance!(
    child_before_parent_is_refused,
    redefining_a_name_replaces_it,
    delete_reparents_the_children,
    deleting_an_unknown_name_is_no_checkpoint,
    an_unknown_domain_is_no_domain,
    self_parents_and_cycles_are_refused,
    listing_is_libvirts_topological_order,
    rendered_xml_round_trips,
    disks_the_domain_lacks_are_accepted,
    schema_refusals,
    domain_info_names_disks_and_state,
    the_hidden_current_checkpoint,
    creating_needs_a_running_domain,
    validate_checks_the_bitmaps_of_a_running_domain,
    bitmap_states_cover_every_disk_of_a_running_domain,
    a_checkpoint_without_bitmap_disks,
    libvirts_own_checkpoint_files,
    purge_deletes_the_checkpoint_and_its_bitmaps,
);

/// libvirt's real delete ([`Backend::purge`]): an unknown name is
/// `NoCheckpoint`, then a shut-off domain is refused; on a running one the
/// checkpoint's metadata and its bitmap on every disk go (a middle one's
/// merged into its parent's, which keeps its name), the children are
/// re-parented, and the next checkpoint still hangs off the leaf.
fn purge_deletes_the_checkpoint_and_its_bitmaps(h: &dyn Harness) {
    let b = h.backend();
    if h.domains_run() {
        // The test driver has no bitmaps: nothing of this applies.
        return;
    }
    let off = h.domain("purge-off", 1, &["c1"]);
    put_ok(h, &off, &def("c1", None, 1, &["vda"]));
    assert_err(b.purge(&off.name, "nope"), K::NoCheckpoint, 103, None);
    assert_err(
        b.purge(&off.name, "c1"),
        K::NotRunning,
        84,
        Some("Operation not supported: cannot delete checkpoint for inactive domain"),
    );
    assert_eq!(tree(h, &off), t(&[("c1", None)]));

    let on = h.running_domain("purge-on", 2, &[]);
    for (name, parent) in [("c1", None), ("c2", Some("c1")), ("c3", Some("c2"))] {
        assert_eq!(h.create(&on, name).unwrap().as_deref(), parent);
    }
    let all = |names: &[&str]| -> Option<Vec<Vec<String>>> {
        Some(vec![names.iter().map(ToString::to_string).collect(); 2])
    };
    assert_eq!(h.image_bitmaps(&on), all(&["c1", "c2", "c3"]));
    b.purge(&on.name, "c2").unwrap();
    assert_eq!(tree(h, &on), t(&[("c1", None), ("c3", Some("c1"))]));
    assert_eq!(h.image_bitmaps(&on), all(&["c1", "c3"]));
    b.purge(&on.name, "c1").unwrap();
    assert_eq!(tree(h, &on), t(&[("c3", None)]));
    assert_eq!(h.image_bitmaps(&on), all(&["c3"]));
    assert_err(b.purge(&on.name, "c1"), K::NoCheckpoint, 103, None);
    assert_eq!(h.create(&on, "c4").unwrap().as_deref(), Some("c3"));
}

// ---------------------------------------------------------------------------
// libvirt's own checkpoint files, parsed

const LIBVIRT_FILES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/libvirt-checkpoints"
);

fn libvirt_file(file: &str) -> String {
    std::fs::read_to_string(format!("{LIBVIRT_FILES}/{file}"))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Every file of `tests/data/libvirt-checkpoints/` with what the parser
/// must make of it (`None`: refused).
fn libvirt_files() -> Vec<(&'static str, Option<CheckpointDef>)> {
    let described = |mut d: CheckpointDef, text: &str| {
        d.description = Some(text.into());
        d
    };
    let install = "Completion of updates after OS install";
    let c1 = def("1525889631", Some("1525111885"), 1_525_889_631, &["vda"]);
    vec![
        ("out/disk-default.xml", Some(described(c1.clone(), install))),
        (
            "out/empty.xml",
            Some(def("1525889631", None, 1_525_889_631, &["vda"])),
        ),
        (
            "out/internal-active-invalid.xml",
            Some(described(c1.clone(), install)),
        ),
        (
            "out/internal-inactive-invalid.xml",
            Some(described(c1.clone(), install)),
        ),
        (
            "out/redefine.xml",
            Some(def("c1", None, 1_553_647_812, &["vda", "vdb"])),
        ),
        ("out/sample.xml", Some(described(c1, install))),
        (
            "out/size.xml",
            Some(described(
                def("c2", Some("1525111885"), 1_553_648_510, &["vda"]),
                "something fun",
            )),
        ),
        ("in/disk-default.xml", None),
        ("in/disk-invalid.xml", None),
        ("in/empty.xml", None),
        ("in/name-invalid.xml", Some(def("../escape", None, 0, &[]))),
        ("in/sample.xml", None),
        (
            "in/size.xml",
            Some(described(def("c2", None, 0, &[]), "something fun")),
        ),
    ]
}

#[test]
fn libvirts_checkpoint_files_parse_and_round_trip() {
    let expected = libvirt_files();
    // Every file present has an expectation, and every expectation a file.
    let mut present = Vec::new();
    for sub in ["in", "out"] {
        for e in std::fs::read_dir(format!("{LIBVIRT_FILES}/{sub}")).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            present.push(format!("{sub}/{name}"));
        }
    }
    present.sort();
    let mut named: Vec<String> = expected.iter().map(|(f, _)| f.to_string()).collect();
    named.sort();
    assert_eq!(present, named);
    for (file, want) in expected {
        let got = ckptstore::testing::parse_checkpoint(&libvirt_file(file));
        match want {
            Some(want) => {
                let got = got.unwrap_or_else(|e| panic!("{file}: {e}"));
                assert_eq!(got, want, "{file}");
                let again = ckptstore::testing::parse_checkpoint(&render_checkpoint(&got)).unwrap();
                assert_eq!(again, got, "{file}: render then parse");
            }
            None => assert!(got.is_err(), "{file} must be refused: {got:?}"),
        }
    }
}
