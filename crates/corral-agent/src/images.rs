//! The host's image files: building JeOS and importing uploaded disks. The records in the store are the
//! controller's business; these functions only make files and say what they made.

use std::path::Path;

use corral_api::{DirectBoot, DiskFormat, ImagePhase, ImageStatus};
use corral_hypervisor::disk;
use uuid::Uuid;

use crate::{layout, AgentError};

fn ready(
    path: &Path,
    format: DiskFormat,
    info: &disk::DiskInfo,
    boot: Option<DirectBoot>,
    message: String,
) -> ImageStatus {
    ImageStatus {
        phase: ImagePhase::Ready,
        format: Some(format),
        path: Some(path.display().to_string()),
        virtual_bytes: info.virtual_size,
        actual_bytes: info.actual_size,
        boot,
        message,
    }
}

/// Builds JeOS into the directory of image `uid`.
pub async fn build_jeos(
    data_dir: &Path,
    uid: Uuid,
    progress: impl Fn(u8, &str),
) -> Result<ImageStatus, AgentError> {
    let out = layout::image_dir(data_dir, uid);
    let jeos = corral_jeos::build(&layout::package_cache(data_dir), &out, progress).await?;
    let info = disk::info(&jeos.disk).await?;
    let boot = DirectBoot {
        kernel: jeos.kernel.display().to_string(),
        initrd: jeos.initrd.display().to_string(),
        cmdline: corral_jeos::CMDLINE.to_string(),
    };
    Ok(ready(
        &jeos.disk,
        DiskFormat::Qcow2,
        &info,
        Some(boot),
        "built from Debian packages".into(),
    ))
}

/// Checks an uploaded file and moves it into the directory of image `uid`. Raw disks are kept raw
/// (clones are qcow2 overlays either way). A file that is not a disk image is refused with the reason.
pub async fn import(data_dir: &Path, uid: Uuid, upload: &Path) -> Result<ImageStatus, AgentError> {
    let format = disk::probe_image(upload)
        .await
        .map_err(|e| AgentError::BadImage(e.to_string()))?;
    let dir = layout::image_dir(data_dir, uid);
    let path = dir.join(format!("disk.{}", format.as_str()));
    let stored = async {
        std::fs::create_dir_all(&dir).map_err(|e| AgentError::io("creating", &dir, e))?;
        std::fs::rename(upload, &path)
            .map_err(|e| AgentError::io("storing the image as", &path, e))?;
        Ok::<_, AgentError>(disk::info(&path).await?)
    };
    match stored.await {
        Ok(info) => Ok(ready(&path, format, &info, None, "imported".into())),
        Err(e) => {
            remove(data_dir, uid);
            Err(e)
        }
    }
}

/// Removes the files of image `uid`.
pub fn remove(data_dir: &Path, uid: Uuid) {
    let _ = std::fs::remove_dir_all(layout::image_dir(data_dir, uid));
}
