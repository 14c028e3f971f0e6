//! The host protocol: what a host's agent and the controller's agent endpoint send each other,
//! besides the store's own types (`corral_store::{Op, KeyValue, WatchPage}`). Both sides link this
//! crate, so neither has to link the other.

use serde::{Deserialize, Serialize};

/// Body of `POST /agent/v1/join`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    pub host: String,
}

/// What a joining host gets: its certificate and key, and the CA to trust.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

/// Body of `POST /agent/v1/ha`: a host's report to the failure detector, every
/// [`crate::timing::RENEW_EVERY`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HaReport {
    /// Peers this host's gossip sees alive.
    pub peers_alive: Vec<String>,
    /// Where the host's gossip listens.
    pub gossip: Option<std::net::SocketAddr>,
    /// The isolation response this host applies now: the one in the controller's last answer
    /// (none before the first), so an operator (and a test) sees when a change has reached it.
    #[serde(default)]
    pub isolation_response: Option<crate::IsolationResponse>,
}

/// The controller's answer to an [`HaReport`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HaReply {
    pub isolation_response: crate::IsolationResponse,
    /// Every other host and where its gossip listens.
    pub peers: Vec<(String, std::net::SocketAddr)>,
}

/// The reason of a VM's `Running` condition between a migration's handover and the target
/// resuming the guest: the controller's task follower waits past it.
pub const RESUMING: &str = "Resuming";
