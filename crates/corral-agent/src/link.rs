//! How a host's agent reaches the controller: it reads the store, and it writes only through the
//! typed host protocol ([`HostWrite`]). It never writes a raw key: it asks the controller to
//! record what it observed or did, and the controller decides from what is stored and which host
//! asks (`corral_controller::host_writes`). A write on an object that changed since the host read
//! it is [`Written::Stale`] and changes nothing: the host reads again and decides again.

pub use corral_api::host_protocol::HostLink;
use corral_api::host_protocol::{HostWrite, MigrationStep, VmRef, Written};
use corral_api::{HostStatus, Migration, Vm};
use corral_store::{get_json, ReadStore, Versioned};

use crate::AgentError;

/// The controller as a host's agent sees it: what it may read, and the host protocol's writes.
pub trait Controller: ReadStore + HostLink {}

impl<T: ReadStore + HostLink + ?Sized> Controller for T {}

/// Reports this host's status (the controller keeps what the operator set).
pub async fn write_heartbeat(ctl: &dyn Controller, status: HostStatus) -> Result<(), AgentError> {
    ctl.write(HostWrite::Heartbeat { status }).await?;
    Ok(())
}

/// Records `vm`'s status, as read at `revision`; `powered_off`: its guest powered itself off (its
/// desired power becomes stopped). The revision written at, or `None` if the VM changed meanwhile.
pub(crate) async fn vm_status(
    ctl: &dyn Controller,
    vm: &Vm,
    revision: u64,
    powered_off: bool,
) -> Result<Option<u64>, AgentError> {
    let (vm_ref, status) = (VmRef::of(vm), vm.status.clone());
    let write = if powered_off {
        HostWrite::GuestPoweredOff {
            vm: vm_ref,
            revision,
            status,
        }
    } else {
        HostWrite::VmStatus {
            vm: vm_ref,
            revision,
            status,
        }
    };
    Ok(match ctl.write(write).await? {
        Written::Applied { revision } => Some(revision),
        Written::Stale => None,
    })
}

/// Applies `change` to the VM at `key` and records its status, reading again whenever the VM
/// changed in between; `change` returns false to leave it as it is.
pub async fn update_vm_status(
    ctl: &dyn Controller,
    key: &str,
    mut change: impl FnMut(&mut Vm) -> bool,
) -> Result<(), AgentError> {
    loop {
        let Some(Versioned {
            value: mut vm,
            revision,
        }) = get_json::<Vm>(ctl, key).await?
        else {
            return Ok(());
        };
        if !change(&mut vm) {
            return Ok(());
        }
        if vm_status(ctl, &vm, revision, false).await?.is_some() {
            return Ok(());
        }
    }
}

/// Takes `step` on the migration record `m`, as read at `revision`; whether it was recorded
/// (false: the record changed meanwhile).
pub(crate) async fn migration_step(
    ctl: &dyn Controller,
    m: &Migration,
    revision: u64,
    step: MigrationStep,
) -> Result<bool, AgentError> {
    let vm = VmRef {
        project: m.project.clone(),
        name: m.vm.clone(),
    };
    let w = HostWrite::Migration { vm, revision, step };
    Ok(matches!(ctl.write(w).await?, Written::Applied { .. }))
}
