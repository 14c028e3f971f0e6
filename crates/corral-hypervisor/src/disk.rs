//! Disk images through `qemu-img`: format detection, and thin linked clones (qcow2 overlays whose
//! backing file is the image), which make a new VM disk cost a few hundred KiB and milliseconds.

use std::path::Path;

use corral_api::DiskFormat;
use serde::Deserialize;
use tokio::process::Command;

use crate::DriverError;

/// What `qemu-img info` says about a file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct DiskInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
    /// Format-specific details; for qcow2, `data.data-file` names an external data file.
    #[serde(rename = "format-specific", default)]
    pub format_specific: Option<serde_json::Value>,
}

impl DiskInfo {
    /// The external data file of a qcow2 image, if it has one.
    pub fn data_file(&self) -> Option<String> {
        let v = self
            .format_specific
            .as_ref()?
            .get("data")?
            .get("data-file")?;
        Some(v.as_str().map_or_else(|| v.to_string(), str::to_string))
    }
}

async fn qemu_img(what: &str, args: &[&str]) -> Result<Vec<u8>, DriverError> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(|e| {
            DriverError::Unavailable(format!(
                "qemu-img cannot be run ({e}): install the Debian package qemu-utils"
            ))
        })?;
    if !out.status.success() {
        return Err(DriverError::io(
            what,
            String::from_utf8_lossy(&out.stderr).trim(),
        ));
    }
    Ok(out.stdout)
}

/// Inspects a disk image; works on images in use (`-U`).
pub async fn info(path: &Path) -> Result<DiskInfo, DriverError> {
    let p = path.to_string_lossy();
    let out = qemu_img(
        "reading the disk image",
        &["info", "-U", "--output=json", &p],
    )
    .await?;
    serde_json::from_slice(&out).map_err(|e| DriverError::io("parsing qemu-img info", e))
}

/// Creates `path` as a qcow2 overlay backed by `backing`. `size` 0 keeps the backing file's size.
pub async fn create_linked_clone(
    backing: &Path,
    backing_format: DiskFormat,
    path: &Path,
    size: u64,
) -> Result<(), DriverError> {
    let b = backing.to_string_lossy();
    let p = path.to_string_lossy();
    let size_arg = size.to_string();
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &b,
        "-F",
        backing_format.as_str(),
        &p,
    ];
    if size > 0 {
        args.push(&size_arg);
    }
    qemu_img("creating the linked clone", &args).await?;
    Ok(())
}

/// Converts the disk image `source` into a new raw image at `target` (a file, or a `qemu-img`
/// protocol target such as `rbd:POOL/IMAGE:conf=...`), with parallel out-of-order writes (about
/// 1.6 times as fast into RBD as one ordered stream).
pub async fn import(source: &Path, format: DiskFormat, target: &str) -> Result<(), DriverError> {
    let s = source.to_string_lossy();
    qemu_img(
        "importing the disk image",
        &[
            "convert",
            "-q",
            "-W",
            "-m",
            "16",
            "-f",
            format.as_str(),
            "-O",
            "raw",
            &s,
            target,
        ],
    )
    .await?;
    Ok(())
}

/// Decides whether a file is a disk image Corral accepts, and which format it has.
///
/// qcow2 is recognised by qemu-img; a qcow2 with a backing file or an external data file is refused (either could point anywhere on
/// the host). Any file is "raw" to qemu-img, so a raw file must also look like a disk: a multiple of
/// 512 bytes that starts with a partition table (MBR or GPT) or a file system Linux boots from.
pub async fn probe_image(path: &Path) -> Result<DiskFormat, DriverError> {
    let info = info(path).await?;
    match info.format.as_str() {
        "qcow2" => {
            if let Some(f) = info.data_file() {
                return Err(DriverError::NotADisk(format!(
                    "the qcow2 image keeps its data in an external file ({f}): convert it to a self-contained image with `qemu-img convert -O qcow2 IN OUT`"
                )));
            }
            if let Some(b) = info.backing_filename {
                return Err(DriverError::NotADisk(format!(
                    "the qcow2 image has a backing file ({b}): flatten it first with `qemu-img convert -O qcow2 IN OUT`"
                )));
            }
            Ok(DiskFormat::Qcow2)
        }
        "raw" => {
            let head = read_head(path, 70_000).map_err(|e| DriverError::io("reading the image", e))?;
            if info.virtual_size % 512 == 0 && info.virtual_size > 0 && looks_like_disk(&head) {
                Ok(DiskFormat::Raw)
            } else {
                Err(DriverError::NotADisk("the file is not a disk image: expected qcow2, or a raw disk with a partition table (MBR/GPT) or file system".into()))
            }
        }
        other => Err(DriverError::NotADisk(format!("disk format {other} is not supported: convert it with `qemu-img convert -O qcow2 IN OUT`"))),
    }
}

fn read_head(path: &Path, n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(n);
    std::fs::File::open(path)?
        .take(n as u64)
        .read_to_end(&mut buf)?;
    Ok(buf)
}

/// Signatures of what a bootable or data disk starts with.
pub fn looks_like_disk(head: &[u8]) -> bool {
    let at = |off: usize, sig: &[u8]| head.get(off..off + sig.len()) == Some(sig);
    at(510, &[0x55, 0xAA])          // MBR (and protective MBR of GPT)
        || at(512, b"EFI PART")     // GPT header
        || at(1080, &[0x53, 0xEF])  // ext2/3/4 superblock magic
        || at(0, b"XFSB")           // XFS
        || at(65600, b"_BHRfS_M") // btrfs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_signatures() {
        let mut mbr = vec![0u8; 1024];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        assert!(looks_like_disk(&mbr));
        let mut ext = vec![0u8; 2048];
        ext[1080] = 0x53;
        ext[1081] = 0xEF;
        assert!(looks_like_disk(&ext));
        assert!(!looks_like_disk(b"#!/bin/sh\necho hello\n"));
        assert!(!looks_like_disk(&vec![0u8; 4096]));
    }
}
