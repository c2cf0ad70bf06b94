//! libvirt XML, written and read with a real XML library (quick-xml):
//! the minimal checkpoint redefine XML, libvirt's checkpoint XML parsed back
//! into the comparable [`CheckpointDef`], and the domain XML facts that sync
//! and validation need ([`DomainInfo`]).
//!
//! Both readers share one walker (`walk`), which checks the root, keeps the
//! path of element names and gathers text; each document is a `Visitor`
//! that picks the elements it needs.

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
        write_parent(w, p)?;
    }
    text_elem(w, "creationTime", &def.creation_time.to_string())?;
    // libvirt's schema refuses an empty <disks>; a checkpoint with no
    // bitmap on any disk (every disk `checkpoint='no'`) is written, and
    // dumped back by libvirt, without it.
    if !def.disks.is_empty() {
        write_disks(w, &def.disks)?;
    }
    w.write_event(Event::End(BytesEnd::new("domaincheckpoint")))?;
    Ok(())
}

/// `<parent><name>P</name></parent>`.
fn write_parent(w: &mut Writer<Vec<u8>>, parent: &str) -> std::io::Result<()> {
    w.write_event(Event::Start(BytesStart::new("parent")))?;
    text_elem(w, "name", parent)?;
    w.write_event(Event::End(BytesEnd::new("parent")))?;
    Ok(())
}

/// `<disks>` with one `<disk name='T' checkpoint='bitmap' bitmap='B'/>` per
/// disk target.
fn write_disks(w: &mut Writer<Vec<u8>>, disks: &BTreeMap<String, String>) -> std::io::Result<()> {
    w.write_event(Event::Start(BytesStart::new("disks")))?;
    for (target, bitmap) in disks {
        let mut e = BytesStart::new("disk");
        e.push_attribute(("name", target.as_str()));
        e.push_attribute(("checkpoint", "bitmap"));
        e.push_attribute(("bitmap", bitmap.as_str()));
        w.write_event(Event::Empty(e))?;
    }
    w.write_event(Event::End(BytesEnd::new("disks")))?;
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

/// What a document reader gathers, element by element, as [`walk`] reads
/// the document. Every `path` holds element names from the root.
trait Visitor {
    /// The kind of document, for errors.
    const WHAT: &'static str;
    /// The name the root element must have.
    const ROOT: &'static [u8];
    /// Whether CDATA sections count as text (otherwise they are skipped).
    const CDATA_IS_TEXT: bool;

    /// An element opens; `path` holds its ancestors.
    fn start(&mut self, path: &[Vec<u8>], e: &BytesStart<'_>) -> Result<(), XmlError>;

    /// An empty element (`<x/>`) below the root; `path` holds its ancestors.
    fn empty(&mut self, path: &[Vec<u8>], e: &BytesStart<'_>) -> Result<(), XmlError>;

    /// An element closes; `path` ends with it, `text` is the character data
    /// read since the last element opened or closed.
    fn end(&mut self, path: &[Vec<u8>], text: &mut String) -> Result<(), XmlError>;
}

/// Reads a whole document into `v`: refuses it when it is not well-formed
/// or its root is not [`Visitor::ROOT`]. Returns whether every element was
/// closed when the document ended.
fn walk<V: Visitor>(xml: &str, v: &mut V) -> Result<bool, XmlError> {
    let what = V::WHAT;
    let mut r = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut text = String::new();
    loop {
        match r.read_event().map_err(|e| err(what, e.to_string()))? {
            Event::Start(e) => {
                let n = e.name().as_ref().to_vec();
                if path.is_empty() && n != V::ROOT {
                    let root = String::from_utf8_lossy(&n);
                    return Err(err(what, format!("root element is <{root}>")));
                }
                v.start(&path, &e)?;
                path.push(n);
                text.clear();
            }
            Event::Empty(e) => {
                if path.is_empty() {
                    return Err(err(what, "empty document element"));
                }
                v.empty(&path, &e)?;
            }
            Event::Text(t) => {
                let raw = t.decode().map_err(|e| err(what, e.to_string()))?;
                push_text(&mut text, &raw, what)?;
            }
            Event::GeneralRef(g) => {
                let name = g.decode().map_err(|e| err(what, e.to_string()))?;
                push_text(&mut text, &format!("&{name};"), what)?;
            }
            Event::CData(c) if V::CDATA_IS_TEXT => {
                text.push_str(&String::from_utf8_lossy(&c.into_inner()));
            }
            Event::End(_) => {
                v.end(&path, &mut text)?;
                path.pop();
                text.clear();
            }
            Event::Eof => return Ok(path.is_empty()),
            _ => {}
        }
    }
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
    let mut parts = CheckpointParts::default();
    if !walk(xml, &mut parts)? {
        return Err(err(
            CheckpointParts::WHAT,
            "document ends inside an element",
        ));
    }
    parts.into_def()
}

/// A `<disk>` of a checkpoint: its target, `checkpoint` and `bitmap`.
type CheckpointDisk = (String, Option<String>, Option<String>);

/// What a checkpoint document says, as it is read.
#[derive(Default)]
struct CheckpointParts {
    name: Option<String>,
    parent: Option<String>,
    creation: Option<i64>,
    description: Option<String>,
    disks: Vec<CheckpointDisk>,
}

/// Is `path` exactly these element names?
fn path_is(path: &[Vec<u8>], want: &[&[u8]]) -> bool {
    path.len() == want.len() && path.iter().zip(want).all(|(a, b)| a == b)
}

/// Is `e` a `<disk>` of `<domaincheckpoint><disks>` (its ancestors `path`)?
fn is_checkpoint_disk(path: &[Vec<u8>], e: &BytesStart<'_>) -> bool {
    path.len() == 2 && path[1] == b"disks" && e.name().as_ref() == b"disk"
}

impl Visitor for CheckpointParts {
    const WHAT: &'static str = "checkpoint";
    const ROOT: &'static [u8] = b"domaincheckpoint";
    const CDATA_IS_TEXT: bool = true;

    fn start(&mut self, path: &[Vec<u8>], e: &BytesStart<'_>) -> Result<(), XmlError> {
        if is_checkpoint_disk(path, e) {
            self.disks.push(disk_attrs(e)?);
        }
        Ok(())
    }

    fn empty(&mut self, path: &[Vec<u8>], e: &BytesStart<'_>) -> Result<(), XmlError> {
        if is_checkpoint_disk(path, e) {
            self.disks.push(disk_attrs(e)?);
        }
        if path.len() == 1 && e.name().as_ref() == b"description" {
            self.description = None;
        }
        Ok(())
    }

    fn end(&mut self, path: &[Vec<u8>], text: &mut String) -> Result<(), XmlError> {
        if path_is(path, &[b"domaincheckpoint", b"name"]) {
            self.name = Some(std::mem::take(text));
        } else if path_is(path, &[b"domaincheckpoint", b"parent", b"name"]) {
            self.parent = Some(std::mem::take(text));
        } else if path_is(path, &[b"domaincheckpoint", b"creationTime"]) {
            let t = text.trim();
            let parsed = t.parse::<i64>();
            let not_a_number = || err(Self::WHAT, format!("creationTime {t:?} is not a number"));
            self.creation = Some(parsed.map_err(|_| not_a_number())?);
        } else if path_is(path, &[b"domaincheckpoint", b"description"]) {
            self.description = Some(std::mem::take(text)).filter(|d| !d.is_empty());
        }
        Ok(())
    }
}

impl CheckpointParts {
    /// The comparable form: a name is required, a missing creation time is
    /// 0, and disks with `checkpoint='no'` are left out.
    fn into_def(self) -> Result<CheckpointDef, XmlError> {
        let name = self.name.ok_or_else(|| err(Self::WHAT, "no <name>"))?;
        // libvirt leaves out a creationTime of 0 when it formats a checkpoint.
        let creation_time = self.creation.unwrap_or(0);
        let mut map = BTreeMap::new();
        for (target, kind, bitmap) in self.disks {
            if kind.as_deref() == Some("no") {
                continue;
            }
            map.insert(target, bitmap.unwrap_or_else(|| name.clone()));
        }
        Ok(CheckpointDef {
            name,
            parent: self.parent,
            creation_time,
            description: self.description,
            disks: map,
        })
    }
}

fn disk_attrs(e: &BytesStart<'_>) -> Result<CheckpointDisk, XmlError> {
    const W: &str = "checkpoint";
    let name = attr(e, b"name", W)?.ok_or_else(|| err(W, "<disk> without a name"))?;
    Ok((name, attr(e, b"checkpoint", W)?, attr(e, b"bitmap", W)?))
}

/// Parse the facts the store needs from a domain's XML. `running` is taken
/// from the caller (libvirt's `virDomainIsActive`), not guessed from the XML.
///
/// # Errors
///
/// [`XmlError`] when the document is not a well-formed `<domain>`.
pub fn parse_domain(xml: &str, running: bool) -> Result<DomainInfo, XmlError> {
    let mut parts = DomainParts::default();
    // A document that ends inside an element is read as far as it goes.
    walk(xml, &mut parts)?;
    if parts.name.is_empty() {
        return Err(err(DomainParts::WHAT, "no <name>"));
    }
    Ok(DomainInfo {
        name: parts.name,
        uuid: parts.uuid,
        running,
        disks: parts.disks,
    })
}

/// What a domain document says, as it is read.
#[derive(Default)]
struct DomainParts {
    name: String,
    uuid: String,
    disks: Vec<DomainDisk>,
    /// The `<devices><disk>` being read.
    disk: Option<DiskParts>,
    /// Depth of `<backingStore>` nesting inside the current disk.
    backing_depth: usize,
}

/// A `<disk>` being read.
struct DiskParts {
    /// `device='disk'` (the default), not a cdrom, floppy or lun.
    is_disk: bool,
    target: Option<String>,
    format: Option<String>,
    source: Option<PathBuf>,
    backing: Vec<PathBuf>,
}

/// Is `e` a `<disk>` of `<domain><devices>` (its ancestors `path`)?
fn is_domain_disk(path: &[Vec<u8>], e: &BytesStart<'_>) -> bool {
    path.len() == 2 && path[1] == b"devices" && e.name().as_ref() == b"disk"
}

impl Visitor for DomainParts {
    const WHAT: &'static str = "domain";
    const ROOT: &'static [u8] = b"domain";
    const CDATA_IS_TEXT: bool = false;

    fn start(&mut self, path: &[Vec<u8>], e: &BytesStart<'_>) -> Result<(), XmlError> {
        if is_domain_disk(path, e) {
            let device = attr(e, b"device", Self::WHAT)?.unwrap_or_else(|| "disk".into());
            self.disk = Some(DiskParts {
                is_disk: device == "disk",
                target: None,
                format: None,
                source: None,
                backing: Vec::new(),
            });
            self.backing_depth = 0;
        } else {
            self.disk_child(path, e)?;
        }
        if e.name().as_ref() == b"backingStore" && self.disk.is_some() {
            self.backing_depth += 1;
        }
        Ok(())
    }

    fn empty(&mut self, path: &[Vec<u8>], e: &BytesStart<'_>) -> Result<(), XmlError> {
        if is_domain_disk(path, e) {
            return Ok(());
        }
        self.disk_child(path, e)
    }

    fn end(&mut self, path: &[Vec<u8>], text: &mut String) -> Result<(), XmlError> {
        let Some((n, parents)) = path.split_last() else {
            return Ok(());
        };
        if parents.len() == 1 && n == b"name" {
            self.name = text.trim().to_string();
        } else if parents.len() == 1 && n == b"uuid" {
            self.uuid = text.trim().to_string();
        } else if n == b"backingStore" && self.disk.is_some() {
            self.backing_depth = self.backing_depth.saturating_sub(1);
        } else if parents.len() == 2 && n == b"disk" {
            self.end_disk();
        }
        Ok(())
    }
}

impl DomainParts {
    /// An element inside the `<disk>` being read (its ancestors `path`):
    /// its `<target>`, `<driver>`, `<source>`, and the `<source>` of each
    /// `<backingStore>`, top first.
    fn disk_child(&mut self, path: &[Vec<u8>], e: &BytesStart<'_>) -> Result<(), XmlError> {
        const W: &str = DomainParts::WHAT;
        let in_disk = path.len() >= 3 && path[1] == b"devices" && path[2] == b"disk";
        let backing_depth = self.backing_depth;
        let Some(disk) = self.disk.as_mut().filter(|_| in_disk) else {
            return Ok(());
        };
        let parent = path.last().map(Vec::as_slice);
        match e.name().as_ref() {
            b"target" if path.len() == 3 => disk.target = attr(e, b"dev", W)?,
            b"driver" if path.len() == 3 => disk.format = attr(e, b"type", W)?,
            b"source" if path.len() == 3 || parent == Some(b"backingStore".as_slice()) => {
                let file = match attr(e, b"file", W)? {
                    Some(f) => Some(f),
                    None => attr(e, b"dev", W)?,
                };
                if let Some(file) = file.map(PathBuf::from) {
                    if backing_depth == 0 {
                        disk.source = Some(file);
                    } else {
                        disk.backing.push(file);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The `<disk>` being read closed: keep it if it is a disk with a
    /// target.
    fn end_disk(&mut self) {
        if let Some(DiskParts {
            is_disk: true,
            target: Some(target),
            format,
            source,
            backing,
        }) = self.disk.take()
        {
            self.disks.push(DomainDisk {
                target,
                format,
                source,
                backing,
            });
        }
    }
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
        let xml = r"<domain type='qemu' id='3'><name>vm1</name><uuid>93a5c045-6457-2c09-e56c-927cdf34e178</uuid>
          <devices>
            <emulator>/usr/bin/qemu-system-x86_64</emulator>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
              <source file='/img/top.qcow2' index='2'/>
              <backingStore type='file' index='1'><format type='qcow2'/><source file='/img/base.qcow2'/><backingStore/></backingStore>
              <target dev='vda' bus='virtio'/></disk>
            <disk type='file' device='cdrom'><source file='/iso'/><target dev='hdc' bus='ide'/></disk>
            <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sdz'/><target dev='vdb'/></disk>
          </devices></domain>";
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
