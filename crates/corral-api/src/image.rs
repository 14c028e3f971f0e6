use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ObjectMeta;

/// Disk image formats Corral accepts.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// Where an image comes from.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum ImageSource {
    /// Built by Corral from Debian packages (cloud kernel + busybox).
    Jeos,
    /// Uploaded by a user.
    Import,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ImageSpec {
    pub source: ImageSource,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ImagePhase {
    Building,
    Ready,
    Failed,
    /// Being deleted: no new VM may use it.
    Deleting,
}

/// Kernel and initramfs that boot an image directly, without firmware or a boot loader.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DirectBoot {
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ImageStatus {
    pub phase: ImagePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Path of the disk on the host; VM disks are thin clones backed by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Size the guest sees.
    #[serde(default)]
    pub virtual_bytes: u64,
    /// Bytes it takes on the host's disk.
    #[serde(default)]
    pub actual_bytes: u64,
    /// Set for images that boot by direct kernel boot (JeOS); others boot from their disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<DirectBoot>,
    #[serde(default)]
    pub message: String,
}

/// A disk image VMs are created from.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Image {
    pub meta: ObjectMeta,
    pub spec: ImageSpec,
    pub status: ImageStatus,
}
