//! The reader's errors: [`Qcow2Error`], which names the file, with its
//! predicates; and `Fault`, a failed check before the caller adds the path.

use std::io;
use std::path::{Path, PathBuf};

/// Why an image (or a chain) could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Qcow2Error {
    /// The file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file does not start with the qcow2 magic `QFI\xfb`.
    #[error("{} is not a qcow2 image", path.display())]
    NotQcow2 {
        /// The file.
        path: PathBuf,
    },
    /// The qcow2 version is neither 2 nor 3.
    #[error("{}: unsupported qcow2 version {version}", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found in the header.
        version: u32,
    },
    /// The image uses a feature QEMU does not know (an unknown incompatible
    /// feature bit or compression type), so QEMU refuses to open it.
    #[error("{}: unsupported qcow2 feature: {detail}", path.display())]
    UnsupportedFeature {
        /// The file.
        path: PathBuf,
        /// What is unsupported.
        detail: String,
    },
    /// The image fails one of QEMU's validity checks, or ends too early.
    #[error("{}: invalid qcow2 image: {detail}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which check failed.
        detail: String,
    },
    /// The header kept changing while the image was read (a running QEMU
    /// rewrote its bitmap directory every time); reading again may work.
    #[error("{}: the image changed during each of {attempts} reads", path.display())]
    Unstable {
        /// The file.
        path: PathBuf,
        /// How many reads were tried.
        attempts: u32,
    },
    /// A backing chain leads back to a file already in it.
    #[error("backing chain loops: {} is already in the chain", path.display())]
    Loop {
        /// The file met twice.
        path: PathBuf,
    },
    /// A backing chain has more than [`MAX_CHAIN_DEPTH`](super::MAX_CHAIN_DEPTH) qcow2 layers.
    #[error("backing chain deeper than {limit} layers at {}", path.display())]
    TooDeep {
        /// The first file not read.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
}

impl Qcow2Error {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Qcow2Error::Io { path, .. }
            | Qcow2Error::NotQcow2 { path }
            | Qcow2Error::UnsupportedVersion { path, .. }
            | Qcow2Error::UnsupportedFeature { path, .. }
            | Qcow2Error::Invalid { path, .. }
            | Qcow2Error::Unstable { path, .. }
            | Qcow2Error::Loop { path }
            | Qcow2Error::TooDeep { path, .. } => path,
        }
    }

    /// The file (an image or a backing file) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Qcow2Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// The file could not be opened or read.
    pub fn is_io(&self) -> bool {
        matches!(self, Qcow2Error::Io { .. })
    }

    /// The file is not a qcow2 image at all.
    pub fn is_not_qcow2(&self) -> bool {
        matches!(self, Qcow2Error::NotQcow2 { .. })
    }

    /// The image is qcow2 but uses a version or feature QEMU does not support.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            Qcow2Error::UnsupportedVersion { .. } | Qcow2Error::UnsupportedFeature { .. }
        )
    }

    /// The image is damaged: QEMU would refuse it or its bitmaps.
    pub fn is_invalid(&self) -> bool {
        matches!(self, Qcow2Error::Invalid { .. })
    }

    /// The image was changing while read; reading again may succeed.
    pub fn is_unstable(&self) -> bool {
        matches!(self, Qcow2Error::Unstable { .. })
    }

    /// The backing chain itself is unusable (a loop, or too deep).
    pub fn is_bad_chain(&self) -> bool {
        matches!(self, Qcow2Error::Loop { .. } | Qcow2Error::TooDeep { .. })
    }
}

pub(super) fn io_error(path: &Path, source: io::Error) -> Qcow2Error {
    Qcow2Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A check failed; the caller adds the path.
#[derive(Debug)]
pub(super) enum Fault {
    NotQcow2,
    Version(u32),
    Unsupported(String),
    Invalid(String),
    /// The buffer ends before this offset.
    Short(u64),
    Io(io::Error),
}

impl Fault {
    pub(super) fn into_error(self, path: &Path) -> Qcow2Error {
        let path = path.to_path_buf();
        match self {
            Fault::NotQcow2 => Qcow2Error::NotQcow2 { path },
            Fault::Version(version) => Qcow2Error::UnsupportedVersion { path, version },
            Fault::Unsupported(detail) => Qcow2Error::UnsupportedFeature { path, detail },
            Fault::Invalid(detail) => Qcow2Error::Invalid { path, detail },
            Fault::Short(end) => Qcow2Error::Invalid {
                path,
                detail: format!("file ends before byte {end}"),
            },
            Fault::Io(source) => Qcow2Error::Io { path, source },
        }
    }
}

pub(super) fn invalid<T>(detail: impl Into<String>) -> Result<T, Fault> {
    Err(Fault::Invalid(detail.into()))
}
