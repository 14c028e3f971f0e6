//! Peer-to-peer membership among the hosts (SWIM, with the foca crate, over UDP on the fabric):
//! the second failure signal beside the controller's. The controller does not declare dead a host
//! that a live peer still sees, and a host that loses the controller but still sees a peer knows it
//! is not isolated.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use foca::{Config, Foca, PostcardCodec, State, Timer};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::ha::HaState;

/// A member: its address, and a number that changes each time the agent starts, so a restarted
/// agent rejoins under a fresh identity instead of being taken for its own dead past.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Member {
    addr: SocketAddr,
    boot: u64,
}

impl foca::Identity for Member {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            addr: self.addr,
            boot: self.boot.wrapping_add(1),
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, other: &Self) -> bool {
        self.boot > other.boot
    }
}

/// Probes fast enough that a dead peer is declared down within about two seconds.
fn config() -> Config {
    let mut c = Config::new_lan(NonZeroU32::new(16).unwrap_or(NonZeroU32::MIN));
    c.probe_period = Duration::from_millis(400);
    c.probe_rtt = Duration::from_millis(150);
    c.suspect_to_down_after = Duration::from_millis(1200);
    c.remove_down_after = Some(Duration::from_secs(30));
    c.periodic_gossip = Some(foca::PeriodicParams {
        frequency: Duration::from_millis(200),
        num_members: std::num::NonZeroUsize::MIN.saturating_add(2),
    });
    c
}

/// Binds the gossip socket (port 0: any free port) and returns the address peers reach it at.
pub(crate) async fn bind(addr: std::net::IpAddr) -> std::io::Result<(UdpSocket, SocketAddr)> {
    let socket = UdpSocket::bind(SocketAddr::new(addr, 0)).await?;
    let local = socket.local_addr()?;
    Ok((socket, local))
}

/// Runs the membership protocol until the task is dropped, keeping `state.peers_alive` current
/// (by host name, as the controller named the peers) and announcing itself to peers it does not
/// know yet.
pub(crate) async fn run(socket: UdpSocket, me: SocketAddr, state: Arc<HaState>) {
    let boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let identity = Member { addr: me, boot };
    let rng = rand::rngs::SmallRng::seed_from_u64(boot ^ u64::from(me.port()));
    let mut foca = Foca::new(identity, config(), rng, PostcardCodec);
    let mut rt = foca::AccumulatingRuntime::new();
    let (timer_tx, mut timers) = mpsc::unbounded_channel::<Timer<Member>>();
    let mut buf = vec![0u8; 2048];
    let mut announce = tokio::time::interval(Duration::from_millis(500));
    loop {
        let result = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, _)) => foca.handle_data(&buf[..n], &mut rt),
                Err(e) => { tracing::debug!(error = %e, "gossip receive failed"); Ok(()) }
            },
            Some(t) = timers.recv() => foca.handle_timer(t, &mut rt),
            _ = announce.tick() => {
                // Peers the controller named that the membership does not hold as active.
                let known: Vec<SocketAddr> = state.peers_known.lock()
                    .map(|p| p.iter().map(|(_, a)| *a).collect()).unwrap_or_default();
                let mut r = Ok(());
                for addr in known.into_iter().filter(|a| *a != me) {
                    if !foca.iter_members().any(|m| m.id().addr == addr) {
                        r = foca.announce(Member { addr, boot: 0 }, &mut rt);
                    }
                }
                r
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "gossip message refused");
        }
        while let Some((to, data)) = rt.to_send() {
            let _ = socket.send_to(&data, to.addr).await;
        }
        while let Some((after, timer)) = rt.to_schedule() {
            let tx = timer_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(timer);
            });
        }
        // Membership changes show in the member states read below.
        while rt.to_notify().is_some() {}
        let alive: Vec<SocketAddr> = foca
            .iter_membership_state()
            .filter(|m| m.state() == State::Alive)
            .map(|m| m.id().addr)
            .collect();
        if let (Ok(known), Ok(mut out)) = (state.peers_known.lock(), state.peers_alive.lock()) {
            *out = known
                .iter()
                .filter(|(_, a)| alive.contains(a))
                .map(|(n, _)| n.clone())
                .collect();
        }
    }
}
