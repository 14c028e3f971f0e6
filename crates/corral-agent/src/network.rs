//! The host's network reconciler: follows VMs, migrations, networks and security groups, plans
//! this host's networking with `corral-network` and has the network driver apply the plan.
//! Idempotent: the same cluster gives the same plan, and applying it again changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_api::{keys, Host, Migration, Network, SecurityGroup, Vm};
use corral_network::{Cluster, HostPlan, NetDriver};
use corral_store::list_json;
use tokio::sync::mpsc;

use crate::link::Controller;
use crate::{AgentConfig, AgentError};

/// Look again this often even when no change arrived (peers' addresses, repairs).
const RESYNC: Duration = Duration::from_secs(5);
/// Apply an unchanged plan again this often, to mend what someone changed by hand.
const REPAIR: Duration = Duration::from_secs(60);

/// Creates the taps (links down) of a VM about to start or arrive here.
pub(crate) async fn prepare(
    store: &dyn Controller,
    cfg: &AgentConfig,
    vm: &Vm,
) -> Result<(), AgentError> {
    if vm.spec.nics.is_empty() {
        return Ok(());
    }
    let (networks, _) = list_json::<Network>(store, &keys::networks(&vm.meta.project)).await?;
    let ports = corral_network::ports_of(vm, &networks);
    if let Some(missing) = vm
        .spec
        .nics
        .iter()
        .find(|n| !networks.iter().any(|net| net.meta.name == n.network))
    {
        return Err(AgentError::Missing {
            what: "network",
            name: missing.network.clone(),
        });
    }
    Ok(cfg.network.prepare_ports(&ports).await?)
}

async fn plan(store: &dyn Controller, host: &str) -> Result<HostPlan, AgentError> {
    let (networks, _) = list_json::<Network>(store, keys::NETWORKS).await?;
    if networks.is_empty() {
        return Ok(HostPlan::default());
    }
    let (vms, _) = list_json::<Vm>(store, keys::VMS).await?;
    let (migrations, _) = list_json::<Migration>(store, keys::MIGRATIONS).await?;
    let (groups, _) = list_json::<SecurityGroup>(store, keys::SECURITY_GROUPS).await?;
    let (hosts, _) = list_json::<Host>(store, keys::HOSTS).await?;
    Ok(corral_network::plan(&Cluster {
        host,
        vms: &vms,
        migrations: &migrations,
        networks: &networks,
        groups: &groups,
        hosts: &hosts,
    }))
}

/// Wakes the reconciler (`true`) on every change of what the plan depends on, until a watch
/// ends (`false`). Hosts are not watched: their heartbeats would wake it every few seconds, and
/// their addresses rarely change (the resync catches them).
fn follow(store: Arc<dyn Controller>, tx: mpsc::Sender<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for prefix in [
            keys::VMS,
            keys::MIGRATIONS,
            keys::NETWORKS,
            keys::SECURITY_GROUPS,
        ] {
            let stream = match store.current_revision().await {
                Ok(rev) => store.watch(prefix, rev + 1).await,
                Err(e) => Err(e),
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "network reconciler cannot watch; polling");
                    let _ = tx.send(false).await;
                    return;
                }
            };
            let tx = tx.clone();
            set.spawn(async move {
                while let Some(Ok(_)) = stream.recv().await {
                    let _ = tx.try_send(true);
                }
            });
        }
        set.join_next().await;
        let _ = tx.send(false).await;
    })
}

/// Keeps this host's networking as the cluster wants it, until the task is dropped.
pub(crate) async fn run(store: Arc<dyn Controller>, net: Arc<dyn NetDriver>, host: String) {
    let mut applied: Option<(HostPlan, Instant)> = None;
    let (tx, mut rx) = mpsc::channel(1);
    let mut watcher = follow(store.clone(), tx.clone());
    loop {
        match plan(&*store, &host).await {
            Ok(p) => {
                let fresh = applied
                    .as_ref()
                    .is_some_and(|(a, at)| *a == p && at.elapsed() < REPAIR);
                if !fresh {
                    match net.apply(&p).await {
                        Ok(()) => applied = Some((p, Instant::now())),
                        Err(e) => {
                            tracing::warn!(error = %e, "applying the host's network plan failed; retrying");
                            applied = None;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the networks; retrying"),
        }
        let wait = if applied.is_some() {
            RESYNC
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            Some(change) = rx.recv() => {
                if !change {
                    watcher.abort();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    watcher = follow(store.clone(), tx.clone());
                }
                // Let a burst of changes settle.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
