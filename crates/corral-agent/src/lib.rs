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
pub mod link;
mod migrate;
mod network;
mod reconcile;
pub mod remote;
mod storage;
pub mod usage;

pub use agent::Agent;
pub use config::{AgentConfig, HEARTBEAT_WITH_REPORTS};
pub use corral_api::layout;
pub use link::{write_heartbeat, Controller, HostLink};

/// What can go wrong on a host, each with what it concerns; a VM's condition shows the sentence.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] corral_store::StoreError),
    #[error(transparent)]
    Driver(#[from] corral_hypervisor::DriverError),
    #[error(transparent)]
    Jeos(#[from] corral_jeos::JeosError),
    #[error(transparent)]
    Ceph(#[from] corral_ceph::CephError),
    #[error("preparing the VM's NICs: {0}")]
    Network(#[from] corral_network::NetError),
    /// A record another party wrote holds what this host refuses to act on (a name, a path).
    #[error(transparent)]
    Invalid(#[from] corral_api::ValidationError),
    /// A record the VM needs is not in the store: `what` is its kind ("datastore", "image").
    #[error("{what} {name} does not exist")]
    Missing { what: &'static str, name: String },
    #[error("image {0} is not ready")]
    ImageNotReady(String),
    /// A file or directory of the host could not be made, moved or removed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file given as an image is not one Corral accepts; the message says why.
    #[error("{0}")]
    BadImage(String),
    /// What this host will not do, and why (a migration it cannot take, a disk it cannot see).
    #[error("{0}")]
    Refused(String),
    /// What the controller would not record for this host, and why.
    #[error(transparent)]
    Write(#[from] corral_api::host_protocol::LinkError),
    #[error(transparent)]
    Pki(#[from] corral_pki::PkiError),
    /// The controller could not be reached, or its answer read.
    #[error("cannot reach the controller at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("the join token is malformed: copy it whole, as the controller gave it")]
    MalformedToken,
    #[error("the controller at {url} does not hold the CA this join token was made for: is it the controller the token came from?")]
    WrongController { url: String },
    /// The controller refused to let this host join; its sentence says why.
    #[error("joining the controller at {url}: {message}")]
    JoinRefused { url: String, message: String },
    /// A certificate or key of this host's credentials does not parse.
    #[error("{what}: {source}")]
    Credentials {
        what: &'static str,
        #[source]
        source: Box<ureq::Error>,
    },
}

impl AgentError {
    pub(crate) fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        AgentError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}
