//! Picking the accelerator. `/dev/kvm` existing is not enough: some kernels (e.g. `kvm_pvm`) offer it
//! without hardware virtualization, and stock guests hang there. KVM is chosen only when the CPU
//! advertises vmx or svm as well.

use std::path::Path;

use corral_api::Accel;

use crate::DriverError;

/// What the operator asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = DriverError;
    fn from_str(s: &str) -> Result<Self, DriverError> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            _ => Err(DriverError::UnknownAccel(s.to_string())),
        }
    }
}

/// Whether this machine can run guests under KVM, from `/proc/cpuinfo` and `/dev/kvm`.
pub fn kvm_usable(cpuinfo: &str, dev_kvm_exists: bool) -> bool {
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    hw && dev_kvm_exists
}

/// Resolves the operator's choice against this machine.
pub fn detect_accel(choice: AccelChoice) -> Result<Accel, DriverError> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let usable = kvm_usable(&cpuinfo, Path::new("/dev/kvm").exists());
    match (choice, usable) {
        (AccelChoice::Auto, true) | (AccelChoice::Kvm, true) => Ok(Accel::Kvm),
        (AccelChoice::Auto, false) | (AccelChoice::Tcg, _) => Ok(Accel::Tcg),
        (AccelChoice::Kvm, false) => Err(DriverError::NoKvm),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_needs_both_flag_and_device() {
        let with = "processor: 0\nflags\t\t: fpu vme vmx sse\n";
        let without = "processor: 0\nflags\t\t: fpu vme sse hypervisor\n";
        assert!(kvm_usable(with, true));
        assert!(!kvm_usable(with, false));
        assert!(
            !kvm_usable(without, true),
            "/dev/kvm alone (kvm_pvm) is not enough"
        );
        assert!(!kvm_usable("flags: fpu vmxx", true));
    }

    #[test]
    fn choice_parses() {
        assert_eq!("tcg".parse::<AccelChoice>().ok(), Some(AccelChoice::Tcg));
        assert!("xen"
            .parse::<AccelChoice>()
            .unwrap_err()
            .to_string()
            .contains("auto, kvm and tcg"));
    }
}
