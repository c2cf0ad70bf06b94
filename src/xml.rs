//! libvirt XML, written and read with a real XML library (quick-xml):
//! the minimal checkpoint redefine XML, libvirt's checkpoint XML parsed back
//! into the comparable [`CheckpointDef`], and the domain XML facts that sync
//! and validation need ([`DomainInfo`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};
use serde::{Deserialize, Serialize};

use crate::chain::CheckpointDef;

/// XML that could not be read as what it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad {what} XML: {detail}")]
pub struct XmlError {
    /// What kind of document ("checkpoint", "domain").
    pub what: &'static str,
    /// What is wrong.
    pub detail: String,
}

fn err(what: &'static str, detail: impl Into<String>) -> XmlError {
    XmlError {
        what,
        detail: detail.into(),
    }
}

/// One disk of a domain, as its XML describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainDisk {
    /// Target name (`sda`, `vda`).
    pub target: String,
    /// Driver format (`qcow2`, `raw`), when given.
    pub format: Option<String>,
    /// Source image path for file- or block-backed disks.
    pub source: Option<PathBuf>,
    /// Backing chain below the source, top first, as libvirt lists it
    /// (often empty for a shut-off domain: read the images instead).
    pub backing: Vec<PathBuf>,
}

/// What sync and validation need to know about a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// The domain's name.
    pub name: String,
    /// The domain's UUID.
    pub uuid: String,
    /// Whether QEMU has the images open (running or paused).
    pub running: bool,
    /// Its disks (`device='disk'` only).
    pub disks: Vec<DomainDisk>,
}

impl DomainInfo {
    /// Does the domain have a disk with this target name?
    pub fn has_target(&self, target: &str) -> bool {
        self.disks.iter().any(|d| d.target == target)
    }
}

/// Render the minimal redefine XML for one checkpoint. Every text and
/// attribute value is escaped. An empty description is left out: libvirt
/// reads `<description></description>` as no description. So is `<disks>`
/// when no disk has a bitmap: libvirt's schema refuses an empty one.
pub fn render_checkpoint(def: &CheckpointDef) -> String {
    let mut w = Writer::new(Vec::with_capacity(256 + 96 * def.disks.len()));
    // Writing into a Vec cannot fail.
    let _ = write_checkpoint(&mut w, def);
    String::from_utf8(w.into_inner()).unwrap_or_default()
}

fn write_checkpoint(w: &mut Writer<Vec<u8>>, def: &CheckpointDef) -> std::io::Result<()> {
    w.write_event(Event::Start(BytesStart::new("domaincheckpoint")))?;
    text_elem(w, "name", &def.name)?;
    if let Some(d) = def.description.as_deref().filter(|d| !d.is_empty()) {
        text_elem(w, "description", d)?;
    }
    if let Some(p) = &def.parent {
        w.write_event(Event::Start(BytesStart::new("parent")))?;
        text_elem(w, "name", p)?;
        w.write_event(Event::End(BytesEnd::new("parent")))?;
    }
    text_elem(w, "creationTime", &def.creation_time.to_string())?;
    // libvirt's schema refuses an empty <disks>; a checkpoint with no
    // bitmap on any disk (every disk `checkpoint='no'`) is written, and
    // dumped back by libvirt, without it.
    if !def.disks.is_empty() {
        w.write_event(Event::Start(BytesStart::new("disks")))?;
        for (target, bitmap) in &def.disks {
            let mut e = BytesStart::new("disk");
            e.push_attribute(("name", target.as_str()));
            e.push_attribute(("checkpoint", "bitmap"));
            e.push_attribute(("bitmap", bitmap.as_str()));
            w.write_event(Event::Empty(e))?;
        }
        w.write_event(Event::End(BytesEnd::new("disks")))?;
    }
    w.write_event(Event::End(BytesEnd::new("domaincheckpoint")))?;
    Ok(())
}

fn text_elem(w: &mut Writer<Vec<u8>>, name: &str, text: &str) -> std::io::Result<()> {
    w.write_event(Event::Start(BytesStart::new(name)))?;
    w.write_event(Event::Text(BytesText::new(text)))?;
    w.write_event(Event::End(BytesEnd::new(name)))?;
    Ok(())
}

/// Append character data (text or an entity reference), unescaped.
fn push_text(text: &mut String, raw: &str, what: &'static str) -> Result<(), XmlError> {
    text.push_str(&quick_xml::escape::unescape(raw).map_err(|e| err(what, e.to_string()))?);
    Ok(())
}

fn attr(e: &BytesStart<'_>, name: &[u8], what: &'static str) -> Result<Option<String>, XmlError> {
    for a in e.attributes() {
        let a = a.map_err(|e| err(what, e.to_string()))?;
        if a.key.as_ref() == name {
            let v = a.unescape_value().map_err(|e| err(what, e.to_string()))?;
            return Ok(Some(v.into_owned()));
        }
    }
    Ok(None)
}

/// Parse libvirt's checkpoint XML (with or without `<domain>`) into the
/// comparable form. Disks with `checkpoint='no'` are left out; a disk with
/// no `bitmap` attribute uses the checkpoint's name, as libvirt does. As
/// libvirt reads and writes them, an empty description is no description,
/// and a missing `creationTime` is 0 (libvirt omits a zero one).
///
/// # Errors
///
/// [`XmlError`] when the document is not well-formed, is not a
/// `<domaincheckpoint>`, or lacks a name or has an invalid creation time.
pub fn parse_checkpoint(xml: &str) -> Result<CheckpointDef, XmlError> {
    const W: &str = "checkpoint";
    let mut r = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut name = None;
    let mut parent = None;
    let mut creation = None;
    let mut description = None;
    let mut disks: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    let mut text = String::new();
    loop {
        let ev = r.read_event().map_err(|e| err(W, e.to_string()))?;
        match ev {
            Event::Start(e) => {
                let n = e.name().as_ref().to_vec();
                if path.is_empty() && n != b"domaincheckpoint" {
                    return Err(err(
                        W,
                        format!("root element is <{}>", String::from_utf8_lossy(&n)),
                    ));
                }
                if path.len() == 2 && path[1] == b"disks" && n == b"disk" {
                    disks.push(disk_attrs(&e)?);
                }
                path.push(n);
                text.clear();
            }
            Event::Empty(e) => {
                let n = e.name().as_ref().to_vec();
                if path.is_empty() {
                    return Err(err(W, "empty document element"));
                }
                if path.len() == 2 && path[1] == b"disks" && n == b"disk" {
                    disks.push(disk_attrs(&e)?);
                }
                if path.len() == 1 && n == b"description" {
                    description = None;
                }
            }
            Event::Text(t) => push_text(
                &mut text,
                &t.decode().map_err(|e| err(W, e.to_string()))?,
                W,
            )?,
            Event::GeneralRef(g) => push_text(
                &mut text,
                &format!("&{};", g.decode().map_err(|e| err(W, e.to_string()))?),
                W,
            )?,
            Event::CData(c) => {
                text.push_str(&String::from_utf8_lossy(&c.into_inner()));
            }
            Event::End(_) => {
                let depth = path.len();
                let is = |p: &[&[u8]]| depth == p.len() && path.iter().zip(p).all(|(a, b)| a == b);
                if is(&[b"domaincheckpoint", b"name"]) {
                    name = Some(std::mem::take(&mut text));
                } else if is(&[b"domaincheckpoint", b"parent", b"name"]) {
                    parent = Some(std::mem::take(&mut text));
                } else if is(&[b"domaincheckpoint", b"creationTime"]) {
                    let t = text.trim();
                    creation = Some(
                        t.parse::<i64>()
                            .map_err(|_| err(W, format!("creationTime {t:?} is not a number")))?,
                    );
                } else if is(&[b"domaincheckpoint", b"description"]) {
                    description = Some(std::mem::take(&mut text)).filter(|d| !d.is_empty());
                }
                path.pop();
                text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !path.is_empty() {
        return Err(err(W, "document ends inside an element"));
    }
    let name = name.ok_or_else(|| err(W, "no <name>"))?;
    // libvirt leaves out a creationTime of 0 when it formats a checkpoint.
    let creation_time = creation.unwrap_or(0);
    let mut map = BTreeMap::new();
    for (target, kind, bitmap) in disks {
        if kind.as_deref() == Some("no") {
            continue;
        }
        map.insert(target, bitmap.unwrap_or_else(|| name.clone()));
    }
    Ok(CheckpointDef {
        name,
        parent,
        creation_time,
        description,
        disks: map,
    })
}

fn disk_attrs(e: &BytesStart<'_>) -> Result<(String, Option<String>, Option<String>), XmlError> {
    const W: &str = "checkpoint";
    let name = attr(e, b"name", W)?.ok_or_else(|| err(W, "<disk> without a name"))?;
    Ok((name, attr(e, b"checkpoint", W)?, attr(e, b"bitmap", W)?))
}

/// The disk being read: (is_disk_device, target, format, source, backing).
type DiskParts = (
    bool,
    Option<String>,
    Option<String>,
    Option<PathBuf>,
    Vec<PathBuf>,
);

/// Parse the facts the store needs from a domain's XML. `running` is taken
/// from the caller (libvirt's `virDomainIsActive`), not guessed from the XML.
///
/// # Errors
///
/// [`XmlError`] when the document is not a well-formed `<domain>`.
pub fn parse_domain(xml: &str, running: bool) -> Result<DomainInfo, XmlError> {
    const W: &str = "domain";
    let mut r = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut name = String::new();
    let mut uuid = String::new();
    let mut text = String::new();
    let mut disks = Vec::new();
    // The disk being read: (is_disk_device, target, format, source, backing)
    let mut cur: Option<DiskParts> = None;
    // Depth of <backingStore> nesting inside the current disk.
    let mut bs_depth = 0usize;
    let handle = |e: &BytesStart<'_>,
                  path: &[Vec<u8>],
                  cur: &mut Option<DiskParts>,
                  bs_depth: usize|
     -> Result<(), XmlError> {
        let n = e.name().as_ref().to_vec();
        let in_disk = path.len() >= 3 && path[1] == b"devices" && path[2] == b"disk";
        if !in_disk {
            return Ok(());
        }
        let Some(c) = cur.as_mut() else { return Ok(()) };
        let parent = path.last().map(Vec::as_slice);
        match n.as_slice() {
            b"target" if path.len() == 3 => c.1 = attr(e, b"dev", W)?,
            b"driver" if path.len() == 3 => c.2 = attr(e, b"type", W)?,
            b"source" if path.len() == 3 || parent == Some(b"backingStore".as_slice()) => {
                let p = match attr(e, b"file", W)? {
                    Some(f) => Some(f),
                    None => attr(e, b"dev", W)?,
                };
                if let Some(p) = p {
                    if bs_depth == 0 {
                        c.3 = Some(PathBuf::from(p));
                    } else {
                        c.4.push(PathBuf::from(p));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    };
    loop {
        let ev = r.read_event().map_err(|e| err(W, e.to_string()))?;
        match ev {
            Event::Start(e) => {
                let n = e.name().as_ref().to_vec();
                if path.is_empty() && n != b"domain" {
                    return Err(err(
                        W,
                        format!("root element is <{}>", String::from_utf8_lossy(&n)),
                    ));
                }
                if path.len() == 2 && path[1] == b"devices" && n == b"disk" {
                    let device = attr(&e, b"device", W)?.unwrap_or_else(|| "disk".into());
                    cur = Some((device == "disk", None, None, None, Vec::new()));
                    bs_depth = 0;
                } else {
                    handle(&e, &path, &mut cur, bs_depth)?;
                }
                if n == b"backingStore" && cur.is_some() {
                    bs_depth += 1;
                }
                path.push(n);
                text.clear();
            }
            Event::Empty(e) => {
                if path.is_empty() {
                    return Err(err(W, "empty document element"));
                }
                if path.len() == 2 && path[1] == b"devices" && e.name().as_ref() == b"disk" {
                    continue;
                }
                handle(&e, &path, &mut cur, bs_depth)?;
            }
            Event::Text(t) => push_text(
                &mut text,
                &t.decode().map_err(|e| err(W, e.to_string()))?,
                W,
            )?,
            Event::GeneralRef(g) => push_text(
                &mut text,
                &format!("&{};", g.decode().map_err(|e| err(W, e.to_string()))?),
                W,
            )?,
            Event::End(_) => {
                let n = path.pop().unwrap_or_default();
                if path.len() == 1 && n == b"name" {
                    name = text.trim().to_string();
                } else if path.len() == 1 && n == b"uuid" {
                    uuid = text.trim().to_string();
                } else if n == b"backingStore" && cur.is_some() {
                    bs_depth = bs_depth.saturating_sub(1);
                } else if path.len() == 2 && n == b"disk" {
                    if let Some((true, Some(target), format, source, backing)) = cur.take() {
                        disks.push(DomainDisk {
                            target,
                            format,
                            source,
                            backing,
                        });
                    }
                    cur = None;
                }
                text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if name.is_empty() {
        return Err(err(W, "no <name>"));
    }
    Ok(DomainInfo {
        name,
        uuid,
        running,
        disks,
    })
}

/// The `size` libvirt gives each disk of a checkpoint's XML read with
/// `VIR_DOMAIN_CHECKPOINT_XML_SIZE`, by target. libvirt sets it only on the
/// disks whose bitmap passes its check (`qemuBlockBitmapChainIsValid`): a
/// bitmap disk without a size failed it.
///
/// # Errors
///
/// [`XmlError`] when the document is not a well-formed checkpoint, or a
/// size is not a number.
pub fn parse_disk_sizes(xml: &str) -> Result<BTreeMap<String, u64>, XmlError> {
    const W: &str = "checkpoint";
    let mut r = Reader::from_str(xml);
    let mut depth = 0usize;
    let mut in_disks = false;
    let mut sizes = BTreeMap::new();
    loop {
        let ev = r.read_event().map_err(|e| err(W, e.to_string()))?;
        let (e, empty) = match &ev {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(e) => {
                depth = depth.saturating_sub(1);
                if depth == 1 && e.name().as_ref() == b"disks" {
                    in_disks = false;
                }
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        if depth == 0 && e.name().as_ref() != b"domaincheckpoint" {
            return Err(err(W, "root element is not <domaincheckpoint>"));
        }
        if depth == 1 && e.name().as_ref() == b"disks" && !empty {
            in_disks = true;
        } else if depth == 2 && in_disks && e.name().as_ref() == b"disk" {
            let (target, _, _) = disk_attrs(e)?;
            if let Some(size) = attr(e, b"size", W)? {
                let size = size.parse::<u64>().map_err(|_| {
                    err(W, format!("size {size:?} of disk {target} is not a number"))
                })?;
                sizes.insert(target, size);
            }
        }
        if !empty {
            depth += 1;
        }
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn def() -> CheckpointDef {
        CheckpointDef {
            name: "c2".into(),
            parent: Some("c1".into()),
            creation_time: 1_552_434_720,
            description: Some("a <b> & ]]> 'q' \"d\" <domain>".into()),
            disks: BTreeMap::from([("sda".into(), "c2".into()), ("vdb".into(), "c2".into())]),
        }
    }

    #[test]
    fn renders_minimal_xml_and_reads_it_back() {
        let xml = render_checkpoint(&def());
        assert!(xml.starts_with("<domaincheckpoint><name>c2</name>"));
        assert!(
            !xml.contains("<domain>"),
            "metacharacters must be escaped: {xml}"
        );
        assert!(!xml.contains("]]>"));
        assert_eq!(parse_checkpoint(&xml).unwrap(), def());
    }

    #[test]
    fn parses_libvirts_own_output() {
        let xml = "<domaincheckpoint>\n  <name>c2</name>\n  <parent>\n    <name>c1</name>\n  </parent>\n  \
                   <creationTime>1700000000</creationTime>\n  <disks>\n    \
                   <disk name='vda' checkpoint='bitmap' bitmap='b2'/>\n    <disk name='vdb' checkpoint='no'/>\n  \
                   </disks>\n  <domain type='qemu'><name>x</name></domain>\n</domaincheckpoint>\n";
        let d = parse_checkpoint(xml).unwrap();
        assert_eq!(d.name, "c2");
        assert_eq!(d.parent.as_deref(), Some("c1"));
        assert_eq!(d.creation_time, 1_700_000_000);
        assert_eq!(d.description, None);
        assert_eq!(
            d.disks,
            BTreeMap::from([("vda".to_string(), "b2".to_string())])
        );
    }

    #[test]
    fn reads_the_sizes_libvirt_gives_valid_bitmaps() {
        // As libvirt 11.3 dumps it with VIR_DOMAIN_CHECKPOINT_XML_SIZE when
        // vdb's bitmap is missing: no size on vdb.
        let xml = "<domaincheckpoint>\n  <name>e2</name>\n  <creationTime>1</creationTime>\n  <disks>\n    \
                   <disk name='vda' checkpoint='bitmap' bitmap='e2' size='65536'/>\n    \
                   <disk name='vdb' checkpoint='bitmap' bitmap='e2'/>\n    <disk name='vdc' checkpoint='no'/>\n  \
                   </disks>\n  <domain type='qemu'><devices><disk type='file'><target dev='vda'/></disk></devices></domain>\n\
                   </domaincheckpoint>\n";
        assert_eq!(
            parse_disk_sizes(xml).unwrap(),
            BTreeMap::from([("vda".to_string(), 65536)])
        );
        assert!(parse_disk_sizes(&xml.replace("65536", "lots")).is_err());
        assert!(parse_disk_sizes("<domain/>").is_err());
    }

    #[test]
    fn reads_libvirts_zero_time_and_empty_description() {
        let d = parse_checkpoint(
            "<domaincheckpoint><name>x</name><description></description></domaincheckpoint>",
        )
        .unwrap();
        assert_eq!((d.creation_time, d.description), (0, None));
        let mut def = def();
        def.description = Some(String::new());
        assert!(!render_checkpoint(&def).contains("description"));
    }

    #[test]
    fn a_checkpoint_without_bitmaps_has_no_disks_element() {
        // What libvirt dumps for `checkpoint-create-as D --diskspec
        // vda,checkpoint=no` on a one-disk domain.
        let dumped = "<domaincheckpoint>\n  <name>k1</name>\n  <creationTime>1796186400</creationTime>\n  \
                      <disks>\n    <disk name='vda' checkpoint='no'/>\n  </disks>\n</domaincheckpoint>\n";
        let d = parse_checkpoint(dumped).unwrap();
        assert!(d.disks.is_empty());
        let xml = render_checkpoint(&d);
        assert_eq!(
            xml,
            "<domaincheckpoint><name>k1</name><creationTime>1796186400</creationTime></domaincheckpoint>"
        );
        assert_eq!(parse_checkpoint(&xml).unwrap(), d);
    }

    #[test]
    fn refuses_what_is_not_a_checkpoint() {
        assert!(parse_checkpoint("<domain/>").is_err());
        assert!(parse_checkpoint("<domaincheckpoint><name>x</name>").is_err());
        assert!(parse_checkpoint(
            "<domaincheckpoint><name>x</name><creationTime>z</creationTime></domaincheckpoint>"
        )
        .is_err());
        assert!(parse_checkpoint("not xml at all").is_err());
        assert!(parse_checkpoint("").is_err());
    }

    #[test]
    fn parses_domain_disks_and_backing_chains() {
        let xml = r#"<domain type='qemu' id='3'><name>vm1</name><uuid>93a5c045-6457-2c09-e56c-927cdf34e178</uuid>
          <devices>
            <emulator>/usr/bin/qemu-system-x86_64</emulator>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
              <source file='/img/top.qcow2' index='2'/>
              <backingStore type='file' index='1'><format type='qcow2'/><source file='/img/base.qcow2'/><backingStore/></backingStore>
              <target dev='vda' bus='virtio'/></disk>
            <disk type='file' device='cdrom'><source file='/iso'/><target dev='hdc' bus='ide'/></disk>
            <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sdz'/><target dev='vdb'/></disk>
          </devices></domain>"#;
        let info = parse_domain(xml, true).unwrap();
        assert_eq!(info.name, "vm1");
        assert_eq!(info.uuid, "93a5c045-6457-2c09-e56c-927cdf34e178");
        assert!(info.running);
        assert_eq!(info.disks.len(), 2);
        assert_eq!(info.disks[0].target, "vda");
        assert_eq!(info.disks[0].format.as_deref(), Some("qcow2"));
        assert_eq!(info.disks[0].source, Some(PathBuf::from("/img/top.qcow2")));
        assert_eq!(
            info.disks[0].backing,
            vec![PathBuf::from("/img/base.qcow2")]
        );
        assert_eq!(info.disks[1].target, "vdb");
        assert_eq!(info.disks[1].source, Some(PathBuf::from("/dev/sdz")));
        assert!(info.has_target("vdb") && !info.has_target("hdc"));
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_-][a-zA-Z0-9_.-]{0,20}"
    }

    proptest! {
        #[test]
        fn render_then_parse_is_identity(
            name in name_strategy(),
            parent in proptest::option::of(name_strategy()),
            t in 0i64..4_000_000_000,
            description in proptest::option::of(any::<String>()),
            disks in proptest::collection::btree_map("[a-z]{2,4}", name_strategy(), 0..5),
        ) {
            // XML 1.0 cannot carry most control characters; libvirt would
            // refuse them too, so the round trip is stated for the rest.
            let description = description.as_deref().map(crate::chain::xml_safe_text).filter(|d| !d.is_empty());
            let d = CheckpointDef { name, parent, creation_time: t, description, disks };
            let back = parse_checkpoint(&render_checkpoint(&d)).unwrap();
            prop_assert_eq!(back, d);
        }
    }
}
