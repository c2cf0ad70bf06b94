//! The redefine document as libvirt reads it before it looks at the
//! domain's checkpoints: well-formed XML, then the schema of
//! `domaincheckpoint.rng` (one method per element and rule), then a name
//! and a creation time, each refusal with libvirt's code.

use std::borrow::Cow;
use std::collections::BTreeSet;

use quick_xml::events::{BytesCData, BytesRef, BytesStart, BytesText, Event};
use quick_xml::Reader;

use super::errors;
use crate::backend::BackendError;
use crate::chain::{is_valid_checkpoint_name, CheckpointDef};
use crate::xml::parse_checkpoint;

/// The elements `domaincheckpoint.rng` allows under the root, each once.
const TOP_LEVEL: [&[u8]; 6] = [
    b"name",
    b"description",
    b"creationTime",
    b"disks",
    b"domain",
    b"parent",
];
/// The top-level elements the schema wants with content.
const NOT_EMPTY: [&[u8]; 4] = [b"name", b"creationTime", b"disks", b"parent"];

/// Read a redefine document as libvirt does: line ends normalised, the
/// checks of [`check_redefine_xml`], then the checkpoint it defines (an
/// empty description is none). Returns it with the UUID of an embedded
/// `<domain>`.
pub(super) fn read_redefine_xml(
    xml: &str,
) -> Result<(CheckpointDef, Option<String>), BackendError> {
    let xml = normalise_line_ends(xml);
    let embedded_uuid = check_redefine_xml(&xml)?;
    let mut def = parse_checkpoint(&xml).map_err(errors::xml_error)?;
    // libvirt reads an empty description as none.
    if def.description.as_deref() == Some("") {
        def.description = None;
    }
    Ok((def, embedded_uuid))
}

/// Check a redefine document as libvirt does before it looks at the
/// domain's checkpoints: well-formed XML (code 35), then the schema of
/// `domaincheckpoint.rng` (code 92), then a `<name>` (code 27), then a
/// `creationTime` (code 1). Returns the UUID of an embedded `<domain>`.
pub(super) fn check_redefine_xml(xml: &str) -> Result<Option<String>, BackendError> {
    if let Some(c) = xml.chars().find(|&c| !is_xml_char(c)) {
        return Err(errors::not_well_formed(format!(
            "character U+{:04X} is not allowed in XML",
            c as u32
        )));
    }
    let mut r = Reader::from_str(xml);
    let mut walk = Walk::new();
    loop {
        match r.read_event().map_err(not_well_formed)? {
            Event::Start(ref e) => walk.open(e, false),
            Event::Empty(ref e) => walk.open(e, true),
            Event::Text(t) => walk.text(&text_of(&t)?),
            Event::GeneralRef(g) => walk.append(&entity_of(&g)?),
            Event::CData(c) => walk.append(&cdata_of(c)),
            Event::End(_) => walk.close(),
            Event::Eof => break,
            _ => {}
        }
    }
    walk.verdict()
}

/// A text node, its references replaced.
fn text_of(t: &BytesText<'_>) -> Result<String, BackendError> {
    let s = t.decode().map_err(not_well_formed)?;
    let s = quick_xml::escape::unescape(&s).map_err(not_well_formed)?;
    Ok(s.into_owned())
}

/// What an entity or character reference stands for.
fn entity_of(g: &BytesRef<'_>) -> Result<String, BackendError> {
    let name = g.decode().map_err(not_well_formed)?;
    let entity = format!("&{name};");
    let s = quick_xml::escape::unescape(&entity).map_err(not_well_formed)?;
    Ok(s.into_owned())
}

/// quick-xml's complaint as libvirt's "not well-formed" error.
fn not_well_formed(e: impl std::fmt::Display) -> BackendError {
    errors::not_well_formed(e.to_string())
}

/// A CDATA section's text.
fn cdata_of(c: BytesCData<'_>) -> String {
    String::from_utf8_lossy(&c.into_inner()).into_owned()
}

/// What the walk through a redefine document has seen so far.
// One flag per element libvirt's schema allows at most once.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug)]
struct Walk {
    /// The open elements, root first.
    path: Vec<Vec<u8>>,
    /// The top-level elements seen.
    seen: BTreeSet<Vec<u8>>,
    /// The text of the element being read.
    text: String,
    /// `<disk>` elements under `<disks>`.
    disks: usize,
    has_time: bool,
    has_name: bool,
    /// `<parent>` has its `<name>`.
    parent_named: bool,
    root_seen: bool,
    /// The `<uuid>` of an embedded `<domain>`.
    domain_uuid: Option<String>,
    /// Nothing the schema refuses so far.
    schema_ok: bool,
}

impl Walk {
    fn new() -> Self {
        Walk {
            path: Vec::new(),
            seen: BTreeSet::new(),
            text: String::new(),
            disks: 0,
            has_time: false,
            has_name: false,
            parent_named: false,
            root_seen: false,
            domain_uuid: None,
            schema_ok: true,
        }
    }

    /// A rule of the schema: the document is refused unless `ok`.
    fn require(&mut self, ok: bool) {
        self.schema_ok &= ok;
    }

    /// An element starts (`empty`: and ends at once).
    fn open(&mut self, e: &BytesStart<'_>, empty: bool) {
        let n = e.name().as_ref().to_vec();
        match self.path.len() {
            0 => self.root(&n),
            1 => self.top_level(&n, empty),
            2 => self.second_level(e, &n, empty),
            // Deeper (inside <domain>, or inside a <disk>): not checked.
            _ => {}
        }
        if !empty {
            self.path.push(n);
        }
        self.text.clear();
    }

    /// The root is `<domaincheckpoint>`.
    fn root(&mut self, n: &[u8]) {
        self.root_seen = true;
        self.require(n == b"domaincheckpoint");
    }

    /// Under the root: known elements, each once, those that need content
    /// with content.
    fn top_level(&mut self, n: &[u8], empty: bool) {
        let first = TOP_LEVEL.contains(&n) && self.seen.insert(n.to_vec());
        self.require(first);
        self.require(!(empty && NOT_EMPTY.contains(&n)));
        self.has_time |= n == b"creationTime";
    }

    /// Under a top-level element: `<disk>`s under `<disks>`, one `<name>`
    /// under `<parent>`, anything under `<domain>`, nothing elsewhere.
    fn second_level(&mut self, e: &BytesStart<'_>, n: &[u8], empty: bool) {
        match self.path[1].as_slice() {
            b"disks" => {
                self.require(n == b"disk" && is_disk_ok(e));
                self.disks += 1;
            }
            b"parent" => {
                self.require(n == b"name" && !empty && !self.parent_named);
                self.parent_named = true;
            }
            b"domain" => {}
            _ => self.require(false),
        }
    }

    /// Text: none directly under the root.
    fn text(&mut self, s: &str) {
        if self.path.len() == 1 && !s.trim().is_empty() {
            self.require(false);
        }
        self.append(s);
    }

    /// Text of a reference or a CDATA section.
    fn append(&mut self, s: &str) {
        self.text.push_str(s);
    }

    /// An element ends: the rules on its text and on what it held.
    fn close(&mut self) {
        let path: Vec<&[u8]> = self.path.iter().map(Vec::as_slice).collect();
        match path.as_slice() {
            [b"domaincheckpoint", b"domain", b"uuid"] => {
                self.domain_uuid = Some(self.text.trim().to_string());
            }
            [b"domaincheckpoint", b"name"] => {
                self.has_name = true;
                self.require(is_valid_checkpoint_name(&self.text));
            }
            [b"domaincheckpoint", b"parent", b"name"] => {
                self.require(is_valid_checkpoint_name(&self.text));
            }
            [b"domaincheckpoint", b"creationTime"] => {
                self.require(is_unsigned_long(&self.text));
            }
            [b"domaincheckpoint", b"disks"] => self.require(self.disks > 0),
            [b"domaincheckpoint", b"parent"] => self.require(self.parent_named),
            _ => {}
        }
        self.path.pop();
        self.text.clear();
    }

    /// The document has ended: libvirt's refusals in libvirt's order.
    fn verdict(self) -> Result<Option<String>, BackendError> {
        if !self.root_seen || !self.path.is_empty() {
            return Err(errors::not_well_formed(
                "document is empty or ends inside an element".into(),
            ));
        }
        if !self.schema_ok {
            return Err(errors::schema_error());
        }
        if !self.has_name {
            return Err(errors::missing_name());
        }
        if !self.has_time {
            return Err(errors::missing_creation_time());
        }
        Ok(self.domain_uuid)
    }
}

/// A `<disk>` of `<disks>`: a disk name, `checkpoint` `bitmap` (the
/// default) or `no` (then no `bitmap` or `size`), an unsigned `size`, and
/// no other attribute.
fn is_disk_ok(e: &BytesStart<'_>) -> bool {
    let mut name = None;
    let mut kind = None;
    let mut extra_ok = true;
    for a in e.attributes() {
        let Ok(a) = a else { return false };
        let Ok(v) = a.unescape_value() else {
            return false;
        };
        match a.key.as_ref() {
            b"name" => name = Some(v.into_owned()),
            b"checkpoint" => kind = Some(v.into_owned()),
            b"bitmap" => {}
            b"size" => extra_ok &= is_unsigned_long(&v),
            _ => extra_ok = false,
        }
    }
    let kind_ok = match kind.as_deref() {
        None | Some("bitmap") => true,
        Some("no") => e
            .attributes()
            .flatten()
            .all(|a| !matches!(a.key.as_ref(), b"bitmap" | b"size")),
        Some(_) => false,
    };
    name.is_some_and(|n| is_disk_name(&n)) && kind_ok && extra_ok
}

/// `unsignedLong` in libvirt's schema: digits only, within u64.
fn is_unsigned_long(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u64>().is_ok()
}

/// libvirt's `diskTargetDev` (`(ioemu:)?(fd|hd|sd|vd|xvd|ubd)[a-zA-Z0-9_]+`)
/// or an absolute path.
fn is_disk_name(s: &str) -> bool {
    if s.starts_with('/') && s.len() > 1 {
        return true;
    }
    let s = s.strip_prefix("ioemu:").unwrap_or(s);
    ["fd", "hd", "sd", "vd", "xvd", "ubd"].iter().any(|p| {
        s.strip_prefix(p).is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
    })
}

/// XML 1.0's `Char` production.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

/// XML end-of-line handling: a parser turns `\r\n` and `\r` into `\n`
/// before anything else.
fn normalise_line_ends(xml: &str) -> Cow<'_, str> {
    if xml.contains('\r') {
        xml.replace("\r\n", "\n").replace('\r', "\n").into()
    } else {
        xml.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::errors::code;

    #[test]
    fn schema_checks_refuse_what_libvirts_schema_refuses() {
        let ok = "<domaincheckpoint><name>c1</name><creationTime>1</creationTime>\
                  <disks><disk name='vda' checkpoint='bitmap' bitmap='c1'/></disks></domaincheckpoint>";
        assert_eq!(check_redefine_xml(ok), Ok(None));
        let code_of = |xml: &str| check_redefine_xml(xml).unwrap_err().code;
        assert_eq!(
            code_of(&ok.replace("<name>c1</name>", "<name>.c1</name>")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(
            code_of(&ok.replace(">1<", ">-1<")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(
            code_of(&ok.replace("vda", "disk0")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(
            code_of(&ok.replace("checkpoint='bitmap'", "checkpoint='maybe'")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(
            code_of(&ok.replace("<disk name='vda' checkpoint='bitmap' bitmap='c1'/>", "")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(
            code_of(&ok.replace("<name>c1</name>", "<name>c1</name><foo/>")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(
            code_of(&ok.replace("<creationTime>1</creationTime>", "")),
            code::INTERNAL_ERROR
        );
        assert_eq!(
            code_of("<domaincheckpoint><name>c1</name>"),
            code::XML_DETAIL
        );
        // No name: refused before the missing creationTime is noticed.
        assert_eq!(code_of("<domaincheckpoint/>"), code::XML_ERROR);
        assert_eq!(
            code_of(
                &ok.replace("<name>c1</name>", "")
                    .replace("<creationTime>1</creationTime>", "")
            ),
            code::XML_ERROR
        );
        // No <disks> at all is fine; an empty one is not.
        let bare =
            "<domaincheckpoint><name>c1</name><creationTime>1</creationTime></domaincheckpoint>";
        assert_eq!(check_redefine_xml(bare), Ok(None));
        assert_eq!(
            code_of(&bare.replace("<creationTime>", "<disks></disks><creationTime>")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(code_of("<domain/>"), code::XML_INVALID_SCHEMA);
        assert!(is_disk_name("sda") && is_disk_name("vdz") && is_disk_name("/img/a.qcow2"));
        assert!(!is_disk_name("vd") && !is_disk_name("nvme0n1") && !is_disk_name("vd-a"));
    }
}
