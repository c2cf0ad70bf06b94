//! The redefine document as libvirt reads it before it looks at the
//! domain's checkpoints: well-formed XML, then the schema of
//! `domaincheckpoint.rng`, then a name and a creation time, each refusal
//! with libvirt's code.

use std::collections::BTreeSet;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::code;
use crate::backend::{BackendError, BackendErrorKind as K};
use crate::chain::is_valid_checkpoint_name;

/// What libvirt says when its RELAX NG schema refuses the document.
pub(super) fn schema_error() -> BackendError {
    BackendError::with_code(
        K::InvalidArgument,
        code::XML_INVALID_SCHEMA,
        "XML document failed to validate against schema: Unable to validate doc against \
         /usr/share/libvirt/schemas/domaincheckpoint.rng\nElement domaincheckpoint failed to validate content\n",
    )
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

/// Check a redefine document as libvirt does before it looks at the
/// domain's checkpoints: well-formed XML (code 35), then the schema of
/// `domaincheckpoint.rng` (code 92), then a `<name>` (code 27), then a
/// `creationTime` (code 1). Returns the UUID of an embedded `<domain>`.
pub(super) fn check_redefine_xml(xml: &str) -> Result<Option<String>, BackendError> {
    let not_well_formed = |e: String| {
        BackendError::with_code(
            K::InvalidArgument,
            code::XML_DETAIL,
            format!("at line 1: {e}"),
        )
    };
    if let Some(c) = xml.chars().find(|&c| !is_xml_char(c)) {
        return Err(not_well_formed(format!(
            "character U+{:04X} is not allowed in XML",
            c as u32
        )));
    }
    let mut r = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut seen: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut text = String::new();
    let mut disks = 0usize;
    let mut has_time = false;
    let mut has_name = false;
    let mut domain_uuid = None;
    let mut schema_ok = true;
    let mut root_seen = false;
    let mut parent_named = false;
    let check_disk = |e: &BytesStart<'_>| -> bool {
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
    };
    loop {
        let ev = r.read_event().map_err(|e| not_well_formed(e.to_string()))?;
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let n = e.name().as_ref().to_vec();
                let empty = matches!(ev, Event::Empty(_));
                match path.len() {
                    0 => {
                        root_seen = true;
                        schema_ok &= n == b"domaincheckpoint";
                    }
                    1 => {
                        let known = [
                            &b"name"[..],
                            b"description",
                            b"creationTime",
                            b"disks",
                            b"domain",
                            b"parent",
                        ];
                        schema_ok &= known.contains(&n.as_slice()) && seen.insert(n.clone());
                        schema_ok &= !(empty
                            && [&b"name"[..], b"creationTime", b"disks", b"parent"]
                                .contains(&n.as_slice()));
                        has_time |= n == b"creationTime";
                    }
                    2 if path[1] == b"disks" => {
                        schema_ok &= n == b"disk" && check_disk(e);
                        disks += 1;
                    }
                    2 if path[1] == b"parent" => {
                        schema_ok &= n == b"name" && !empty && !parent_named;
                        parent_named = true;
                    }
                    2 if path[1] != b"domain" => schema_ok = false,
                    _ => {}
                }
                if !empty {
                    path.push(n);
                }
                text.clear();
            }
            Event::Text(t) => {
                let s = t.decode().map_err(|e| not_well_formed(e.to_string()))?;
                let s =
                    quick_xml::escape::unescape(&s).map_err(|e| not_well_formed(e.to_string()))?;
                if path.len() == 1 && !s.trim().is_empty() {
                    schema_ok = false;
                }
                text.push_str(&s);
            }
            Event::GeneralRef(g) => {
                let name = g.decode().map_err(|e| not_well_formed(e.to_string()))?;
                let entity = format!("&{name};");
                let s = quick_xml::escape::unescape(&entity)
                    .map_err(|e| not_well_formed(e.to_string()))?;
                text.push_str(&s);
            }
            Event::CData(c) => text.push_str(&String::from_utf8_lossy(&c.into_inner())),
            Event::End(_) => {
                let at =
                    |p: &[&[u8]]| path.len() == p.len() && path.iter().zip(p).all(|(a, b)| a == b);
                if at(&[b"domaincheckpoint", b"domain", b"uuid"]) {
                    domain_uuid = Some(text.trim().to_string());
                }
                if at(&[b"domaincheckpoint", b"name"])
                    || at(&[b"domaincheckpoint", b"parent", b"name"])
                {
                    has_name |= path.len() == 2;
                    schema_ok &= is_valid_checkpoint_name(&text);
                } else if at(&[b"domaincheckpoint", b"creationTime"]) {
                    schema_ok &= is_unsigned_long(&text);
                } else if at(&[b"domaincheckpoint", b"disks"]) {
                    schema_ok &= disks > 0;
                } else if at(&[b"domaincheckpoint", b"parent"]) {
                    schema_ok &= parent_named;
                }
                path.pop();
                text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !root_seen || !path.is_empty() {
        return Err(not_well_formed(
            "document is empty or ends inside an element".into(),
        ));
    }
    if !schema_ok {
        return Err(schema_error());
    }
    if !has_name {
        return Err(BackendError::with_code(
            K::InvalidArgument,
            code::XML_ERROR,
            "XML error: a redefined checkpoint must have a name",
        ));
    }
    if !has_time {
        return Err(BackendError::with_code(
            K::Other,
            code::INTERNAL_ERROR,
            "internal error: missing creationTime from existing checkpoint",
        ));
    }
    Ok(domain_uuid)
}

/// XML 1.0's `Char` production.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

/// XML end-of-line handling: a parser turns `\r\n` and `\r` into `\n`
/// before anything else.
pub(super) fn normalise_line_ends(xml: &str) -> std::borrow::Cow<'_, str> {
    if xml.contains('\r') {
        xml.replace("\r\n", "\n").replace('\r', "\n").into()
    } else {
        xml.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
