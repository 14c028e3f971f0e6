//! Builds "jeos", the small guest image Corral starts VMs from: Debian's cloud kernel, and a busybox
//! userland on an ext4 disk, from Debian packages only (fetched with `apt-get download`, unpacked with
//! `dpkg-deb`). The kernel and an initramfs (virtio modules + a mount-and-switch script) boot it
//! directly; the disk is the image VMs get thin clones of.
//!
//! The guest prints [`READY_MARKER`] on its serial console once userspace runs, keeps a shell on the
//! serial console, and powers off on the ACPI power button.

use std::path::{Path, PathBuf};

use tokio::process::Command;

/// What the guest prints on its serial console when userspace is up.
pub const READY_MARKER: &str = "corral-jeos: userspace up";
/// Kernel command line of the image (the agent appends the VM's host name).
pub const CMDLINE: &str = "console=ttyS0 quiet";

const KERNEL_META: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "busybox-static";
/// Kernel modules the initramfs loads, in dependency order.
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "drivers/block/virtio_blk",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
    "drivers/acpi/button",
    "drivers/input/evdev",
];
/// Size of the root file system; VM disks may be larger (the extra space is a plain block device).
const ROOTFS_MIB: u64 = 64;

/// The built image.
#[derive(Clone, Debug)]
pub struct Jeos {
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum JeosError {
    #[error("{step} failed: {message}")]
    Step { step: String, message: String },
    #[error("the Debian package {0} is not known to apt: run `apt-get update` (scripts/setup.sh does) and try again")]
    UnknownPackage(String),
}

fn step(step: &str, e: impl std::fmt::Display) -> JeosError {
    JeosError::Step {
        step: step.into(),
        message: e.to_string(),
    }
}

async fn run(what: &str, cmd: &mut Command) -> Result<String, JeosError> {
    let out = cmd.output().await.map_err(|e| step(what, e))?;
    if !out.status.success() {
        return Err(step(what, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The concrete kernel package the `linux-image-cloud-amd64` meta package points at.
async fn kernel_package() -> Result<String, JeosError> {
    let out = run(
        "asking apt for the kernel package",
        Command::new("apt-cache").args(["depends", KERNEL_META]),
    )
    .await
    .map_err(|_| JeosError::UnknownPackage(KERNEL_META.into()))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .ok_or_else(|| JeosError::UnknownPackage(KERNEL_META.into()))
}

/// Downloads a package into `cache` unless a .deb of it is already there; returns the .deb path.
async fn fetch_deb(cache: &Path, package: &str) -> Result<PathBuf, JeosError> {
    let find = |dir: &Path| -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
    };
    if let Some(p) = find(cache) {
        return Ok(p);
    }
    // Download beside the cache and move in only when complete: an interrupted download is never
    // mistaken for a cached package.
    let partial = cache.join(format!(".partial-{package}"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| step("preparing the package cache", e))?;
    let what = format!("apt-get download {package}");
    run(
        &what,
        Command::new("apt-get")
            .arg("download")
            .arg(package)
            .current_dir(&partial),
    )
    .await?;
    let got = find(&partial).ok_or_else(|| JeosError::UnknownPackage(package.into()))?;
    let dest = cache.join(got.file_name().unwrap_or_default());
    std::fs::rename(&got, &dest).map_err(|e| step("filling the package cache", e))?;
    let _ = std::fs::remove_dir_all(&partial);
    Ok(dest)
}

async fn unpack(deb: &Path, dir: &Path) -> Result<(), JeosError> {
    run(
        "unpacking a package",
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir),
    )
    .await
    .map(|_| ())
}

fn write_exec(path: &Path, text: &str) -> Result<(), JeosError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| step("writing the guest files", e))?;
    }
    std::fs::write(path, text).map_err(|e| step("writing the guest files", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| step("writing the guest files", e))
}

/// Builds the image into `out` (replacing what is there), keeping downloaded packages in `cache`.
/// `progress` is told the percentage done and the current step.
pub async fn build(
    cache: &Path,
    out: &Path,
    progress: impl Fn(u8, &str),
) -> Result<Jeos, JeosError> {
    let io = |e: std::io::Error| step("preparing the build directory", e);
    std::fs::create_dir_all(cache).map_err(io)?;
    let work = out.with_extension("building");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io)?;

    progress(5, "downloading the Debian cloud kernel and busybox-static");
    let kpkg = kernel_package().await?;
    let kdeb = fetch_deb(cache, &kpkg).await?;
    let bdeb = fetch_deb(cache, BUSYBOX).await?;
    progress(30, "unpacking packages");
    let kdir = work.join("kernel");
    let bdir = work.join("busybox");
    unpack(&kdeb, &kdir).await?;
    unpack(&bdeb, &bdir).await?;
    let busybox = bdir.join("bin/busybox");
    let (vmlinuz, modules) = find_kernel(&kdir)?;

    progress(50, "building the initramfs");
    let ird = work.join("initramfs");
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib/modules"] {
        std::fs::create_dir_all(ird.join(d)).map_err(io)?;
    }
    std::fs::copy(&busybox, ird.join("bin/busybox")).map_err(io)?;
    for m in MODULES {
        let src = modules.join(format!("{m}.ko"));
        let name = src.file_name().map(|n| n.to_owned()).unwrap_or_default();
        std::fs::copy(&src, ird.join("lib/modules").join(name))
            .map_err(|e| step(&format!("copying kernel module {}", src.display()), e))?;
    }
    write_exec(&ird.join("init"), include_str!("../guest/init"))?;
    let initrd = work.join("initrd.img");
    let list = run(
        "listing the initramfs",
        Command::new("find").arg(".").current_dir(&ird),
    )
    .await?;
    cpio(&ird, &list, &initrd).await?;

    progress(70, "building the root file system");
    let root = work.join("root");
    for d in [
        "bin",
        "sbin",
        "etc/init.d",
        "etc/acpi/PWRF",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "var/log",
        "usr/bin",
        "usr/sbin",
    ] {
        std::fs::create_dir_all(root.join(d)).map_err(io)?;
    }
    std::fs::copy(&busybox, root.join("bin/busybox")).map_err(io)?;
    let applets = run(
        "listing busybox applets",
        Command::new(&busybox).arg("--list"),
    )
    .await?;
    for a in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        let _ = std::os::unix::fs::symlink("/bin/busybox", root.join("bin").join(a));
    }
    std::os::unix::fs::symlink("/bin/busybox", root.join("sbin/init")).map_err(io)?;
    std::fs::write(root.join("etc/inittab"), include_str!("../guest/inittab")).map_err(io)?;
    write_exec(&root.join("etc/init.d/rcS"), include_str!("../guest/rcS"))?;
    write_exec(
        &root.join("etc/udhcpc.script"),
        include_str!("../guest/udhcpc.script"),
    )?;
    write_exec(
        &root.join("etc/acpi/PWRF/00000080"),
        "#!/bin/sh\npoweroff\n",
    )?;
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").map_err(io)?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n").map_err(io)?;
    let raw = work.join("root.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(ROOTFS_MIB << 20))
        .map_err(io)?;
    run(
        "making the ext4 file system",
        Command::new("mkfs.ext4")
            .args(["-q", "-L", "jeos", "-d"])
            .arg(&root)
            .arg(&raw),
    )
    .await?;
    progress(85, "converting the disk to qcow2");
    let disk = work.join("disk.qcow2");
    run(
        "converting to qcow2",
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&disk),
    )
    .await?;

    progress(95, "installing the image");
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out).map_err(io)?;
    let result = Jeos {
        disk: out.join("disk.qcow2"),
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.img"),
    };
    std::fs::rename(&disk, &result.disk).map_err(io)?;
    std::fs::copy(&vmlinuz, &result.kernel).map_err(io)?;
    std::fs::rename(&initrd, &result.initrd).map_err(io)?;
    let _ = std::fs::remove_dir_all(&work);
    progress(100, "done");
    Ok(result)
}

/// The kernel image and its module tree inside an unpacked kernel package.
fn find_kernel(kdir: &Path) -> Result<(PathBuf, PathBuf), JeosError> {
    let missing = || {
        step(
            "finding the kernel",
            format!("no boot/vmlinuz-* in {}", kdir.display()),
        )
    };
    let boot = std::fs::read_dir(kdir.join("boot")).map_err(|_| missing())?;
    let vmlinuz = boot
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(missing)?;
    let version = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default();
    let modules = kdir.join("lib/modules").join(version).join("kernel");
    Ok((vmlinuz, modules))
}

/// Writes a newc cpio archive of `dir` (the kernel's initramfs format) with `cpio`.
async fn cpio(dir: &Path, list: &str, out: &Path) -> Result<(), JeosError> {
    use tokio::io::AsyncWriteExt;
    let file = std::fs::File::create(out).map_err(|e| step("creating the initramfs", e))?;
    let mut child = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(file)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| step("running cpio (install the Debian package cpio)", e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(list.as_bytes())
            .await
            .map_err(|e| step("running cpio", e))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| step("running cpio", e))?;
    if !out.status.success() {
        return Err(step("running cpio", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}
