//! Removing a checkpoint's bitmap from a shut-off domain's images: the
//! [`ImageEditor`] trait and [`QemuImg`], which runs
//! `qemu-img bitmap --remove` on the one layer that holds the bitmap (found
//! with the in-process reader through the backing chain,
//! [`layers_holding`]).
//!
//! QEMU's own image lock decides who may write: `qemu-img` refuses an image
//! another process (a running QEMU, `qemu-nbd`, `qemu-io`) has open
//! ("Failed to get \"write\" lock"), which is [`ImageEditError::InUse`].
//! Nothing here ever asks `qemu-img` to share a lock (`-U`) for a write.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::images::{ImageError, ImageReader};
use crate::qcow2;

/// What a removal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// The bitmap was in the image and is gone now.
    Removed,
    /// The image held no bitmap of that name (a removal made before, or
    /// never there): nothing to do.
    AlreadyGone,
}

/// Why a bitmap could not be removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageEditError {
    /// Another process holds the image open (QEMU's write lock).
    #[error("image {} is in use by another process: {message}", image.display())]
    InUse {
        /// The image.
        image: PathBuf,
        /// `qemu-img`'s message.
        message: String,
    },
    /// The removal failed otherwise (no `qemu-img`, an unreadable image).
    #[error("cannot remove a bitmap from image {}: {message}", image.display())]
    Failed {
        /// The image.
        image: PathBuf,
        /// Why.
        message: String,
    },
}

/// Where bitmaps are removed from image files. [`QemuImg`] runs
/// `qemu-img`; the test seam of a store may supply another.
pub trait ImageEditor {
    /// Remove the bitmap named `bitmap` from the image file `image` (one
    /// layer: not its backing files). Idempotent: an absent bitmap is
    /// [`Removed::AlreadyGone`].
    ///
    /// # Errors
    ///
    /// [`ImageEditError::InUse`] when another process holds the image,
    /// [`ImageEditError::Failed`] otherwise.
    fn remove_bitmap(&self, image: &Path, bitmap: &str) -> Result<Removed, ImageEditError>;

    /// Refuse now, before any change, an image that another process holds
    /// open: the check a transaction makes before its intent.
    ///
    /// # Errors
    ///
    /// [`ImageEditError::InUse`]; [`ImageEditError::Failed`] when it cannot
    /// tell.
    fn check_writable(&self, image: &Path) -> Result<(), ImageEditError>;
}

/// The real editor: `qemu-img bitmap --remove` (`qemu-img` from `PATH`).
#[derive(Debug, Clone, Copy, Default)]
pub struct QemuImg;

/// QEMU's message when another process holds an image's lock.
fn is_lock_refusal(stderr: &str) -> bool {
    stderr.contains("\"write\" lock") || stderr.contains("Is another process using the image")
}

/// Does the file `image` (this layer alone) hold a bitmap named `bitmap`?
fn holds(image: &Path, bitmap: &str) -> Result<bool, ImageEditError> {
    qcow2::read_image(image)
        .map(|i| i.bitmaps.iter().any(|b| b.name == bitmap))
        .map_err(|e| ImageEditError::Failed {
            image: image.to_path_buf(),
            message: e.to_string(),
        })
}

fn run(image: &Path, args: &[&std::ffi::OsStr]) -> Result<(), ImageEditError> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| ImageEditError::Failed {
            image: image.to_path_buf(),
            message: format!("cannot run qemu-img: {e}"),
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let message = stderr.lines().next().unwrap_or("").trim().to_string();
    if is_lock_refusal(&stderr) {
        Err(ImageEditError::InUse {
            image: image.to_path_buf(),
            message,
        })
    } else {
        Err(ImageEditError::Failed {
            image: image.to_path_buf(),
            message,
        })
    }
}

impl ImageEditor for QemuImg {
    fn remove_bitmap(&self, image: &Path, bitmap: &str) -> Result<Removed, ImageEditError> {
        if !holds(image, bitmap)? {
            return Ok(Removed::AlreadyGone);
        }
        let result = run(
            image,
            &[
                "bitmap".as_ref(),
                "--remove".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                image.as_os_str(),
                bitmap.as_ref(),
            ],
        );
        match result {
            Ok(()) => Ok(Removed::Removed),
            // Removed meanwhile by someone else: the goal is reached.
            Err(ImageEditError::Failed { .. }) if matches!(holds(image, bitmap), Ok(false)) => {
                Ok(Removed::AlreadyGone)
            }
            Err(e) => Err(e),
        }
    }

    /// `qemu-img bitmap --remove` of a name the image does not hold: it
    /// takes the write lock exactly as a removal does (refused as in use),
    /// then fails with "not found" and removes nothing. `qemu-img info`
    /// would not do: it passes while a reader holds the image, which still
    /// refuses a writer.
    fn check_writable(&self, image: &Path) -> Result<(), ImageEditError> {
        let mut probe = String::from("ckptstore-lock-probe");
        while holds(image, &probe)? {
            probe.push('-');
        }
        match run(
            image,
            &[
                "bitmap".as_ref(),
                "--remove".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                image.as_os_str(),
                probe.as_ref(),
            ],
        ) {
            Ok(()) => Ok(()),
            Err(ImageEditError::Failed { message, .. }) if message.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The layers of the disk image `top` (top first, down its backing chain)
/// that hold a bitmap named `bitmap`.
///
/// # Errors
///
/// The reader's: an image that is not qcow2 holds no bitmap (an empty
/// list), an unreadable one is an error.
pub(crate) fn layers_holding(
    reader: &dyn ImageReader,
    top: &Path,
    bitmap: &str,
) -> Result<Vec<PathBuf>, ImageError> {
    match reader.read_chain(top) {
        Ok(chain) => Ok(chain
            .layers
            .into_iter()
            .filter(|l| l.bitmaps.iter().any(|b| b.name == bitmap))
            .map(|l| l.path)
            .collect()),
        Err(ImageError::NotQcow2 { .. }) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}
