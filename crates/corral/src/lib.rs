//! What the `corral` binary wires between the controller and a host's agent when both run in one
//! process (`corral up`, simulated hosts in the controller), kept in a library so the tests that
//! run them in-process wire them the same way. The controller links no agent or hypervisor: it
//! gets these through its traits.

use std::path::{Path, PathBuf};

use corral_api::host_protocol::{HaReply, HaReport};
use corral_api::ImageStatus;
use corral_controller::{Ctx, ImageError, ImageFiles, Progress};

/// The failure detector's link for an agent in the controller's own process.
pub struct LocalHaLink {
    pub ctx: Ctx,
    pub host: String,
}

#[async_trait::async_trait]
impl corral_agent::ha::HaLink for LocalHaLink {
    async fn report(&self, report: HaReport) -> Result<HaReply, corral_agent::AgentError> {
        Ok(corral_controller::ha::report(&self.ctx, &self.host, report))
    }
}

/// Image files in the controller's data dir, made with the agent's tools (JeOS from Debian
/// packages, `qemu-img` to probe uploads).
pub struct HostImages {
    pub data_dir: PathBuf,
}

fn failed(e: corral_agent::AgentError) -> ImageError {
    match e {
        corral_agent::AgentError::BadImage(why) => ImageError::Bad(why),
        other => ImageError::Failed(other.to_string()),
    }
}

#[async_trait::async_trait]
impl ImageFiles for HostImages {
    async fn build_jeos(
        &self,
        uid: uuid::Uuid,
        progress: Progress,
    ) -> Result<ImageStatus, ImageError> {
        corral_agent::images::build_jeos(&self.data_dir, uid, move |p: u8, m: &str| progress(p, m))
            .await
            .map_err(failed)
    }

    async fn import(&self, uid: uuid::Uuid, upload: &Path) -> Result<ImageStatus, ImageError> {
        corral_agent::images::import(&self.data_dir, uid, upload)
            .await
            .map_err(failed)
    }

    fn remove(&self, uid: uuid::Uuid) {
        corral_agent::images::remove(&self.data_dir, uid);
    }
}
