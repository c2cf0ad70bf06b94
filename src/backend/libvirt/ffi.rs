//! The only `unsafe` code in the crate: a small safe wrapper over the raw
//! `virDomainCheckpoint*` functions of `virt::sys`, which the `virt` crate
//! does not wrap.
//!
//! Every checkpoint handle libvirt returns is owned by a [`Checkpoint`],
//! whose `Drop` calls `virDomainCheckpointFree`, so no handle leaks on any
//! path, error paths included. Errors are libvirt's thread-local last error,
//! read right after the failing call.

use std::ffi::{c_char, c_uint, CStr, CString};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

/// `VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE`
pub(crate) const CREATE_REDEFINE: c_uint = sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE;
/// `VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE`
pub(crate) const CREATE_REDEFINE_VALIDATE: c_uint =
    sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE;
/// `VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL`
pub(crate) const LIST_TOPOLOGICAL: c_uint = sys::VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL;
/// `VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN`
pub(crate) const XML_NO_DOMAIN: c_uint = sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN;
/// `VIR_DOMAIN_CHECKPOINT_XML_SIZE`
pub(crate) const XML_SIZE: c_uint = sys::VIR_DOMAIN_CHECKPOINT_XML_SIZE;
/// `VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY`
pub(crate) const DELETE_METADATA_ONLY: c_uint = sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY;

/// An owned reference to one libvirt checkpoint object.
#[derive(Debug)]
pub(crate) struct Checkpoint {
    ptr: sys::virDomainCheckpointPtr,
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // SAFETY: `ptr` is a non-null handle this value owns (one reference,
        // taken when libvirt returned it); it is released exactly once here.
        // A failure can only mean an invalid handle, which cannot happen.
        let _ = unsafe { sys::virDomainCheckpointFree(self.ptr) };
    }
}

impl Checkpoint {
    /// Take ownership of a handle libvirt returned, or read the last error
    /// when it returned NULL.
    fn own(ptr: sys::virDomainCheckpointPtr) -> Result<Checkpoint, Error> {
        if ptr.is_null() {
            Err(Error::last_error())
        } else {
            Ok(Checkpoint { ptr })
        }
    }

    /// `virDomainCheckpointGetXMLDesc`.
    pub(crate) fn xml_desc(&self, flags: c_uint) -> Result<String, Error> {
        // SAFETY: `ptr` is a live handle owned by `self`.
        let xml = unsafe { sys::virDomainCheckpointGetXMLDesc(self.ptr, flags) };
        take_string(xml)
    }

    /// `virDomainCheckpointGetName`.
    pub(crate) fn name(&self) -> Result<String, Error> {
        // SAFETY: `ptr` is a live handle owned by `self`; libvirt returns a
        // pointer into the handle's own data (never to be freed by the
        // caller), or NULL on error.
        let s = unsafe { sys::virDomainCheckpointGetName(self.ptr) };
        if s.is_null() {
            return Err(Error::last_error());
        }
        // SAFETY: `s` is non-null and NUL-terminated, and stays valid while
        // `self` lives, which covers this copy.
        Ok(unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
    }

    /// `virDomainCheckpointDelete`.
    pub(crate) fn delete(&self, flags: c_uint) -> Result<(), Error> {
        // SAFETY: `ptr` is a live handle owned by `self`; deleting the
        // checkpoint does not free the handle, which `Drop` still releases.
        let rc = unsafe { sys::virDomainCheckpointDelete(self.ptr, flags) };
        if rc < 0 {
            Err(Error::last_error())
        } else {
            Ok(())
        }
    }
}

/// Copy a string libvirt allocated for the caller, then free it.
fn take_string(s: *mut c_char) -> Result<String, Error> {
    if s.is_null() {
        return Err(Error::last_error());
    }
    // SAFETY: `s` is a non-null, NUL-terminated string that libvirt
    // allocated with malloc and handed to the caller; it is copied, then
    // freed exactly once with the matching allocator.
    unsafe {
        let out = CStr::from_ptr(s).to_string_lossy().into_owned();
        libc::free(s.cast());
        Ok(out)
    }
}

fn c_string(s: &str) -> Result<CString, Error> {
    Ok(CString::new(s)?)
}

/// `virDomainCheckpointCreateXML`: a new checkpoint, or a redefined one
/// with [`CREATE_REDEFINE`].
pub(crate) fn create_xml(dom: &Domain, xml: &str, flags: c_uint) -> Result<Checkpoint, Error> {
    let xml = c_string(xml)?;
    // SAFETY: `dom.as_ptr()` is a live domain handle borrowed for the call;
    // `xml` outlives the call; the returned handle (if any) is owned by the
    // new `Checkpoint`.
    let ptr = unsafe { sys::virDomainCheckpointCreateXML(dom.as_ptr(), xml.as_ptr(), flags) };
    Checkpoint::own(ptr)
}

/// `virDomainCheckpointLookupByName`.
pub(crate) fn lookup_by_name(dom: &Domain, name: &str) -> Result<Checkpoint, Error> {
    let name = c_string(name)?;
    // SAFETY: as in `create_xml`.
    let ptr = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), name.as_ptr(), 0) };
    Checkpoint::own(ptr)
}

/// `virDomainListAllCheckpoints`, in libvirt's order.
pub(crate) fn list_all(dom: &Domain, flags: c_uint) -> Result<Vec<Checkpoint>, Error> {
    let mut array: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
    // SAFETY: `dom.as_ptr()` is a live domain handle; `array` is a valid
    // out-pointer that libvirt sets to a malloc'ed array on success.
    let n = unsafe { sys::virDomainListAllCheckpoints(dom.as_ptr(), &raw mut array, flags) };
    if n < 0 {
        return Err(Error::last_error());
    }
    let mut out = Vec::with_capacity(n as usize);
    if array.is_null() {
        return Ok(out);
    }
    // SAFETY: on success `array` holds `n` non-null handles, each carrying
    // one reference for the caller; every one is moved into a `Checkpoint`
    // (which frees it), then the array itself is freed once. Nothing in
    // between can fail or unwind.
    unsafe {
        for i in 0..n as usize {
            out.push(Checkpoint { ptr: *array.add(i) });
        }
        libc::free(array.cast());
    }
    Ok(out)
}

/// Do two `Connect` values hold the same libvirt connection?
pub(crate) fn same_connection(a: &Connect, b: &Connect) -> bool {
    // SAFETY: `as_ptr` only copies the pointers out of two live values; they
    // are compared, never dereferenced.
    unsafe { a.as_ptr() == b.as_ptr() }
}
