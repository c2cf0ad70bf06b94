//! The baseline image reader of the benches: a disk's chain read by
//! running `qemu-img info --output=json --backing-chain -U` once per image,
//! so `validate_with` runs the same comparison logic with another reader.

use std::path::Path;

use ckptstore::testing::{DiskChain, ImageError, ImageReader, Layer, LayerBitmap};
use serde_json::Value;

/// Reads a disk's chain by running `qemu-img info` once per image.
pub struct QemuImgReader;

impl ImageReader for QemuImgReader {
    fn read_chain(&self, path: &Path) -> Result<DiskChain, ImageError> {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "--backing-chain", "-U"])
            .arg(path)
            .output()
            .map_err(|e| ImageError::Unreadable {
                path: path.into(),
                reason: e.to_string(),
            })?;
        if !out.status.success() {
            let reason = String::from_utf8_lossy(&out.stderr).into_owned();
            return Err(ImageError::Unreadable {
                path: path.into(),
                reason,
            });
        }
        let layers: Vec<Value> =
            serde_json::from_slice(&out.stdout).map_err(|e| ImageError::Unreadable {
                path: path.into(),
                reason: e.to_string(),
            })?;
        let layers = layers
            .iter()
            .take_while(|l| l["format"] == "qcow2")
            .map(|l| Layer {
                path: l["filename"].as_str().unwrap_or_default().into(),
                // qemu-img lists no bitmaps of an inconsistent extension.
                bitmaps_consistent: true,
                bitmaps: l["format-specific"]["data"]["bitmaps"]
                    .as_array()
                    .map(|list| {
                        list.iter()
                            .map(|b| {
                                let flag = |f: &str| {
                                    b["flags"]
                                        .as_array()
                                        .is_some_and(|fl| fl.iter().any(|x| x == f))
                                };
                                LayerBitmap {
                                    name: b["name"].as_str().unwrap_or_default().into(),
                                    in_use: flag("in-use"),
                                    auto: flag("auto"),
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect();
        Ok(DiskChain {
            layers,
            unfollowed: None,
        })
    }
}
