//! Bounded reads: big-endian fields of a buffer, checked against its end
//! (a short buffer is `Fault::Short`, which asks for a longer read), C
//! strings, and positioned reads of a file.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use super::error::Fault;

/// The length of a regular file or a block device (whose metadata says 0).
pub(super) fn file_len(file: &File) -> io::Result<u64> {
    let mut handle = file;
    handle.seek(SeekFrom::End(0))
}

/// Reads exactly `len` bytes at `offset`.
pub(super) fn read_at(file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "read too large"))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Big-endian fields of a byte buffer, bounds-checked.
pub(super) struct Bytes<'a>(pub(super) &'a [u8]);

impl Bytes<'_> {
    pub(super) fn slice(&self, at: u64, len: u64) -> Result<&[u8], Fault> {
        let end = at.checked_add(len).ok_or(Fault::Short(u64::MAX))?;
        let range = usize::try_from(at).ok().zip(usize::try_from(end).ok());
        range
            .and_then(|(a, e)| self.0.get(a..e))
            .ok_or(Fault::Short(end))
    }

    pub(super) fn array<const N: usize>(&self, at: u64) -> Result<[u8; N], Fault> {
        let s = self.slice(at, N as u64)?;
        <[u8; N]>::try_from(s).map_err(|_| Fault::Short(at))
    }

    pub(super) fn u8(&self, at: u64) -> Result<u8, Fault> {
        Ok(self.array::<1>(at)?[0])
    }

    pub(super) fn u16(&self, at: u64) -> Result<u16, Fault> {
        self.array(at).map(u16::from_be_bytes)
    }

    pub(super) fn u32(&self, at: u64) -> Result<u32, Fault> {
        self.array(at).map(u32::from_be_bytes)
    }

    pub(super) fn u64(&self, at: u64) -> Result<u64, Fault> {
        self.array(at).map(u64::from_be_bytes)
    }
}

/// A string as QEMU reads it into a C buffer: cut at the first NUL.
pub(super) fn c_bytes(raw: &[u8]) -> &[u8] {
    raw.iter().position(|&b| b == 0).map_or(raw, |n| &raw[..n])
}

pub(super) fn c_string(raw: &[u8]) -> String {
    String::from_utf8_lossy(c_bytes(raw)).into_owned()
}
