//! The host agent. It owns what happens on one hypervisor host: it registers the host, and for every
//! VM assigned to the host runs a reconciler that moves the hypervisor toward the VM's spec and
//! records what it observed in the VM's status. It also keeps the host's image files.
//!
//! The agent never decides *what* should run (that is the API's and the scheduler's job); it only makes
//! it so, idempotently: running a reconcile twice changes nothing the second time. Everything it needs
//! to find a running VM again lives in the VM's run directory, so a restarted agent adopts running
//! guests instead of restarting them.

mod agent;
mod config;
mod gossip;
mod guest;
pub mod ha;
pub mod images;
mod lifecycle;
mod migrate;
mod network;
mod reconcile;
pub mod remote;
mod storage;
pub mod usage;

pub use agent::{write_heartbeat, Agent};
pub use config::{AgentConfig, HEARTBEAT_WITH_REPORTS};
pub use corral_api::layout;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] corral_store::StoreError),
    #[error(transparent)]
    Driver(#[from] corral_hypervisor::DriverError),
    #[error(transparent)]
    Jeos(#[from] corral_jeos::JeosError),
    /// The file given as an image is not one Corral accepts; the message says why.
    #[error("{0}")]
    BadImage(String),
    #[error("{0}")]
    Other(String),
}
