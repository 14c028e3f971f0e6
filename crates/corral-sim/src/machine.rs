//! What a simulated host has instead of a machine: a hypervisor ([`SimDriver`], the fake driver
//! with a boot time, a link speed and fault injection), a network driver with nothing to plumb
//! ([`SimNet`]), a power switch ([`Power`]), and a network link to the controller that is cut
//! while the machine is off ([`PoweredStore`]). The host agent running on top is the real one.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use corral_agent::Controller;
use corral_api::host_protocol::{HostLink, HostWrite, LinkError, Written};
use corral_api::DiskFormat;
use corral_hypervisor::fake::FakeDriver;
use corral_hypervisor::{Driver, DriverError, Incoming, LaunchSpec, Observed, Transfer, Tuning};
use corral_network::{HostPlan, NetDriver, NetError, PortPlan};
use corral_store::{KeyValue, ReadStore, Revision, StoreError, WatchStream};

/// Whether a simulated machine runs: killed by fault injection, or in standby (DPM), it is off.
#[derive(Debug, Default)]
pub(crate) struct Power {
    dead: AtomicBool,
    standby: AtomicBool,
}

impl Power {
    pub(crate) fn on(&self) -> bool {
        !self.dead.load(Ordering::SeqCst) && !self.standby.load(Ordering::SeqCst)
    }
    pub(crate) fn dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }
    pub(crate) fn standby(&self) -> bool {
        self.standby.load(Ordering::SeqCst)
    }
    pub(crate) fn set_dead(&self, dead: bool) {
        self.dead.store(dead, Ordering::SeqCst);
    }
    pub(crate) fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::SeqCst);
    }
}

const OFF: &str = "the simulated host is powered off";

/// Dice shared by a fleet: a number from 0 to 1 per throw (splitmix64 over a counter).
#[derive(Debug)]
pub(crate) struct Dice(AtomicU64);

impl Dice {
    pub(crate) fn new(seed: u64) -> Self {
        Dice(AtomicU64::new(seed))
    }
    /// True with the chance `p`.
    pub(crate) fn roll(&self, p: f64) -> bool {
        p > 0.0 && unit(self.0.fetch_add(1, Ordering::Relaxed)) < p
    }
}

/// A number from 0 to 1 that is the same for the same seed (splitmix64).
pub(crate) fn unit(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as f64 / u64::MAX as f64
}

/// The hypervisor of a simulated host: the fake driver (VMs in memory, migrations between the
/// fakes of one process, copying at the link's speed) with a guest boot time, failures thrown by
/// the fleet's dice, and disks that are placeholder files naming their backing image. Nothing
/// works while the machine is off.
pub(crate) struct SimDriver {
    pub(crate) fake: FakeDriver,
    pub(crate) power: Arc<Power>,
    pub(crate) dice: Arc<Dice>,
    pub(crate) boot: Duration,
    pub(crate) fail_starts: f64,
    pub(crate) fail_migrations: f64,
}

/// What a placeholder disk holds before the name of its backing image.
const CLONE_OF: &str = "simulated linked clone of ";

impl SimDriver {
    fn powered(&self) -> Result<(), DriverError> {
        if self.power.on() {
            Ok(())
        } else {
            Err(DriverError::Unavailable(OFF.into()))
        }
    }
}

#[async_trait]
impl Driver for SimDriver {
    async fn start(&self, run_dir: &Path, spec: &LaunchSpec) -> Result<u32, DriverError> {
        self.powered()?;
        // The guest boots; the machine may go off meanwhile.
        tokio::time::sleep(self.boot).await;
        self.powered()?;
        if self.dice.roll(self.fail_starts) {
            self.fake
                .fail_next_start("simulated start failure (fault injection)");
        }
        self.fake.start(run_dir, spec).await
    }
    async fn observe(&self, run_dir: &Path) -> Result<Option<Observed>, DriverError> {
        self.powered()?;
        self.fake.observe(run_dir).await
    }
    async fn powerdown(&self, run_dir: &Path) -> Result<(), DriverError> {
        self.powered()?;
        self.fake.powerdown(run_dir).await
    }
    async fn reset(&self, run_dir: &Path) -> Result<(), DriverError> {
        self.powered()?;
        self.fake.reset(run_dir).await
    }
    async fn kill(&self, run_dir: &Path) -> Result<(), DriverError> {
        self.powered()?;
        self.fake.kill(run_dir).await
    }
    async fn fence(&self, run_dir: &Path) -> Result<bool, DriverError> {
        self.powered()?;
        self.fake.fence(run_dir).await
    }
    async fn start_incoming(
        &self,
        run_dir: &Path,
        spec: &LaunchSpec,
        address: std::net::IpAddr,
        export_disk: bool,
    ) -> Result<Incoming, DriverError> {
        self.powered()?;
        if self.dice.roll(self.fail_migrations) {
            self.fake
                .fail_next_start("simulated failure (fault injection)");
        }
        self.fake
            .start_incoming(run_dir, spec, address, export_disk)
            .await
    }
    async fn mirror_disk(&self, run_dir: &Path, to: SocketAddr) -> Result<(), DriverError> {
        self.powered()?;
        self.fake.mirror_disk(run_dir, to).await
    }
    async fn send(
        &self,
        run_dir: &Path,
        to: SocketAddr,
        tuning: &Tuning,
    ) -> Result<(), DriverError> {
        self.powered()?;
        if self.dice.roll(self.fail_migrations) {
            self.fake
                .fail_next_migration("the copy failed: simulated failure (fault injection)");
        }
        self.fake.send(run_dir, to, tuning).await
    }
    async fn transfer(&self, run_dir: &Path) -> Result<Transfer, DriverError> {
        self.powered()?;
        self.fake.transfer(run_dir).await
    }
    async fn cancel_transfer(&self, run_dir: &Path) -> Result<(), DriverError> {
        self.powered()?;
        self.fake.cancel_transfer(run_dir).await
    }
    async fn finish_disk_copy(&self, run_dir: &Path) -> Result<(), DriverError> {
        self.powered()?;
        self.fake.finish_disk_copy(run_dir).await
    }
    async fn copy_disk(&self, run_dir: &Path, dest: &Path) -> Result<(), DriverError> {
        self.powered()?;
        self.fake.copy_disk(run_dir, dest).await
    }
    async fn switch_disk(&self, run_dir: &Path, dest: &Path) -> Result<(), DriverError> {
        self.powered()?;
        self.fake.switch_disk(run_dir, dest).await
    }
    async fn resume(&self, run_dir: &Path) -> Result<(), DriverError> {
        self.powered()?;
        self.fake.resume(run_dir).await
    }
    async fn create_disk(
        &self,
        backing: &Path,
        _format: DiskFormat,
        disk: &Path,
        _size: u64,
    ) -> Result<(), DriverError> {
        self.powered()?;
        std::fs::write(disk, format!("{CLONE_OF}{}\n", backing.display()))
            .map_err(|e| DriverError::io(format!("creating {}", disk.display()), e))
    }
    async fn disk_backing(&self, disk: &Path) -> Result<Option<String>, DriverError> {
        self.powered()?;
        let text = std::fs::read_to_string(disk)
            .map_err(|e| DriverError::io(format!("reading {}", disk.display()), e))?;
        Ok(text
            .strip_prefix(CLONE_OF)
            .map(|b| b.trim_end().to_string()))
    }
}

/// The network driver of a simulated host: there are no bridges, taps or firewalls to make.
#[derive(Debug)]
pub(crate) struct SimNet;

#[async_trait]
impl NetDriver for SimNet {
    async fn apply(&self, _plan: &HostPlan) -> Result<(), NetError> {
        Ok(())
    }
    async fn prepare_ports(&self, _ports: &[PortPlan]) -> Result<(), NetError> {
        Ok(())
    }
}

/// The controller as a simulated host's agent reaches it: through the host's own connection, cut
/// while the machine is off (a dead host's agent writes nothing, as a dead machine's would not).
pub(crate) struct PoweredStore {
    pub(crate) store: Arc<dyn Controller>,
    pub(crate) power: Arc<Power>,
}

impl PoweredStore {
    fn powered(&self) -> Result<&dyn Controller, StoreError> {
        if self.power.on() {
            Ok(&*self.store)
        } else {
            Err(StoreError::Backend {
                path: "the controller".into(),
                message: OFF.into(),
            })
        }
    }
}

#[async_trait]
impl ReadStore for PoweredStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.powered()?.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.powered()?.list(prefix).await
    }
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        self.powered()?.watch(prefix, from).await
    }
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.powered()?.current_revision().await
    }
}

#[async_trait]
impl HostLink for PoweredStore {
    async fn write(&self, write: HostWrite) -> Result<Written, LinkError> {
        let ctl = self
            .powered()
            .map_err(|e| LinkError::Unavailable(e.to_string()))?;
        ctl.write(write).await
    }
}
