//! The Linux network driver: iproute2 for bridges, VXLAN and VLAN devices, taps and forwarding
//! entries; `nft` for the firewall; one dnsmasq per network for DHCP.
//!
//! It removes only what it created: every bridge, uplink and tap it makes is recorded in
//! `owned.json` in its directory, so a host's other interfaces (and a second agent's, in tests)
//! are never touched, and what a crashed agent left behind is found again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tokio::sync::Mutex;

use corral_hypervisor::signal;

use crate::nft::TABLE;
use crate::{HostPlan, NetDriver, NetError, NetPlan, PortPlan, Uplink};

const VXLAN_PORT: u16 = 4789;
const ZERO_MAC: &str = "00:00:00:00:00:00";

/// What this driver created, so it removes exactly that.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct Owned {
    bridges: BTreeSet<String>,
    uplinks: BTreeSet<String>,
    taps: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct State {
    owned: Owned,
    /// The ruleset `nft` last accepted (none yet in this process: apply it once).
    ruleset: Option<String>,
    /// Taps made for a VM about to start, and when: a plan read before that may not know them.
    prepared: HashMap<String, std::time::Instant>,
}

/// Applies plans to this host's Linux networking.
#[derive(Debug)]
pub struct LinuxNet {
    dir: PathBuf,
    /// The host's fabric address: VXLAN tunnels start here, VLANs go out of its interface.
    address: IpAddr,
    state: Mutex<State>,
}

/// One link as `ip -j link show` describes it.
#[derive(Debug, Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    address: Option<String>,
}

impl Link {
    fn up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }

    /// A tap has carrier while a process (QEMU) holds it open.
    fn in_use(&self) -> bool {
        self.flags.iter().any(|f| f == "LOWER_UP")
    }
}

/// How long a freshly prepared tap is kept even by a plan that does not name it (the plan may
/// have been read just before the VM was started).
const PREPARED_GRACE: Duration = Duration::from_secs(30);

async fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    run_input(program, args, None).await
}

async fn run_input(program: &str, args: &[&str], input: Option<&str>) -> Result<String, NetError> {
    use tokio::io::AsyncWriteExt;
    let what = || format!("`{program} {}`", args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| NetError::Command {
        what: what(),
        message: format!(
            "{e} (install it: the Debian packages iproute2, nftables and dnsmasq-base)"
        ),
    })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .await
            .map_err(|e| NetError::io(what(), e))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| NetError::io(what(), e))?;
    if !out.status.success() {
        return Err(NetError::Command {
            what: what(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn ip(args: &[&str]) -> Result<String, NetError> {
    run("ip", args).await
}

async fn links() -> Result<HashMap<String, Link>, NetError> {
    let out = ip(&["-j", "link", "show"]).await?;
    let links: Vec<Link> =
        serde_json::from_str(&out).map_err(|e| NetError::io("reading `ip -j link`", e))?;
    Ok(links.into_iter().map(|l| (l.ifname.clone(), l)).collect())
}

fn write_sysctl(path: &str, value: &str, why: &str) -> Result<(), NetError> {
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == value => Ok(()),
        Ok(_) => {
            std::fs::write(path, value).map_err(|e| NetError::io(format!("setting {path}"), e))
        }
        Err(e) => Err(NetError::Unsupported(format!(
            "{path} is missing ({e}): {why}"
        ))),
    }
}

impl LinuxNet {
    /// A driver keeping its records in `dir` (created when needed).
    pub fn new(dir: PathBuf, address: IpAddr) -> Self {
        let owned = std::fs::read(dir.join("owned.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        LinuxNet {
            dir,
            address,
            state: Mutex::new(State {
                owned,
                ruleset: None,
                prepared: HashMap::new(),
            }),
        }
    }

    fn save(&self, owned: &Owned) -> Result<(), NetError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| NetError::io("creating the network state dir", e))?;
        let tmp = self.dir.join("owned.json.tmp");
        let bytes = serde_json::to_vec_pretty(owned)
            .map_err(|e| NetError::io("recording owned links", e))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, self.dir.join("owned.json")))
            .map_err(|e| NetError::io("recording owned links", e))
    }

    async fn ensure_bridge(
        &self,
        st: &mut State,
        links: &HashMap<String, Link>,
        name: &str,
        mtu: u32,
    ) -> Result<(), NetError> {
        if !links.contains_key(name) {
            st.owned.bridges.insert(name.to_string());
            self.save(&st.owned)?;
            ip(&["link", "add", name, "type", "bridge"]).await?;
        }
        if links.get(name).is_none_or(|l| l.mtu != mtu) {
            ip(&["link", "set", name, "mtu", &mtu.to_string()]).await?;
        }
        Ok(())
    }

    async fn ensure_tap(
        &self,
        st: &mut State,
        links: &HashMap<String, Link>,
        p: &PortPlan,
    ) -> Result<(), NetError> {
        let link = links.get(&p.tap);
        if link.is_none() {
            st.owned.taps.insert(p.tap.clone());
            self.save(&st.owned)?;
            ip(&["tuntap", "add", "dev", &p.tap, "mode", "tap"]).await?;
        }
        if link.is_none_or(|l| l.mtu != p.mtu) {
            ip(&["link", "set", &p.tap, "mtu", &p.mtu.to_string()]).await?;
        }
        if link.is_none_or(|l| l.master.as_deref() != Some(&p.bridge)) {
            ip(&["link", "set", &p.tap, "master", &p.bridge]).await?;
        }
        Ok(())
    }

    async fn ensure_network(
        &self,
        st: &mut State,
        links: &HashMap<String, Link>,
        n: &NetPlan,
    ) -> Result<(), NetError> {
        self.ensure_bridge(st, links, &n.bridge, n.mtu).await?;
        let br = links.get(&n.bridge);
        if br.is_none_or(|l| l.address.as_deref() != Some(n.gateway_mac.as_str())) {
            ip(&["link", "set", &n.bridge, "address", &n.gateway_mac]).await?;
        }
        let cidr = format!("{}/{}", n.gateway, n.prefix);
        ip(&["addr", "replace", &cidr, "dev", &n.bridge]).await?;
        if br.is_none_or(|l| !l.up()) {
            ip(&["link", "set", &n.bridge, "up"]).await?;
        }
        let dev = self
            .ensure_uplink(st, links, &n.bridge, &n.uplink, n.mtu)
            .await?;
        if matches!(n.uplink, Uplink::Vxlan { .. }) {
            self.sync_fdb(&dev, n).await?;
        }
        Ok(())
    }

    /// Makes the bridge's uplink (VXLAN device or VLAN interface) and attaches it; returns its name.
    async fn ensure_uplink(
        &self,
        st: &mut State,
        links: &HashMap<String, Link>,
        bridge: &str,
        uplink: &Uplink,
        mtu: u32,
    ) -> Result<String, NetError> {
        let dev = match uplink {
            Uplink::Vxlan { dev, .. } | Uplink::Vlan { dev, .. } => dev.clone(),
        };
        let link = links.get(&dev);
        if link.is_none() {
            st.owned.uplinks.insert(dev.clone());
            self.save(&st.owned)?;
            match uplink {
                Uplink::Vxlan { vni, .. } => {
                    let (vni, local, port) = (
                        vni.to_string(),
                        self.address.to_string(),
                        VXLAN_PORT.to_string(),
                    );
                    ip(&[
                        "link",
                        "add",
                        &dev,
                        "type",
                        "vxlan",
                        "id",
                        &vni,
                        "local",
                        &local,
                        "dstport",
                        &port,
                        "nolearning",
                    ])
                    .await?;
                }
                Uplink::Vlan { id, .. } => {
                    let parent = self.fabric_interface().await?;
                    let id = id.to_string();
                    ip(&["link", "add", "link", &parent, "name", &dev, "type", "vlan", "id", &id])
                        .await
                        .map_err(|e| match e {
                            NetError::Command { message, .. } if message.contains("Unknown device type") => {
                                NetError::Unsupported(
                                    "this host's kernel cannot make VLAN interfaces (no 802.1Q support): load it with `modprobe 8021q`, or use an overlay network (leave out --vlan)".into()
                                )
                            }
                            e => e,
                        })?;
                }
            }
        }
        if link.is_none_or(|l| l.mtu != mtu) {
            ip(&["link", "set", &dev, "mtu", &mtu.to_string()]).await?;
        }
        if link.is_none_or(|l| l.master.as_deref() != Some(bridge) || !l.up()) {
            ip(&["link", "set", &dev, "master", bridge, "up"]).await?;
        }
        Ok(dev)
    }

    /// The interface that holds the host's fabric address (VLANs go out of it).
    async fn fabric_interface(&self) -> Result<String, NetError> {
        #[derive(Deserialize)]
        struct Addr {
            ifname: String,
            #[serde(default)]
            addr_info: Vec<AddrInfo>,
        }
        #[derive(Deserialize)]
        struct AddrInfo {
            #[serde(default)]
            local: Option<String>,
        }
        let out = ip(&["-j", "addr", "show"]).await?;
        let addrs: Vec<Addr> =
            serde_json::from_str(&out).map_err(|e| NetError::io("reading `ip -j addr`", e))?;
        let me = self.address.to_string();
        addrs
            .into_iter()
            .find(|a| a.addr_info.iter().any(|i| i.local.as_deref() == Some(&me)))
            .map(|a| a.ifname)
            .ok_or_else(|| {
                NetError::Unsupported(format!(
                    "no interface holds this host's fabric address {me}: a VLAN network needs the fabric on a local interface (pass the right `corral agent --address`)"
                ))
            })
    }

    /// Makes the VXLAN device's forwarding entries exactly the plan's: one all-zeros entry per
    /// peer (broadcasts and unknown destinations go to each) and one per remote VM MAC.
    async fn sync_fdb(&self, dev: &str, n: &NetPlan) -> Result<(), NetError> {
        #[derive(Deserialize)]
        struct Entry {
            mac: String,
            #[serde(default)]
            dst: Option<String>,
        }
        let out = run("bridge", &["-j", "fdb", "show", "dev", dev]).await?;
        let have: BTreeSet<(String, String)> = serde_json::from_str::<Vec<Entry>>(&out)
            .map_err(|e| NetError::io("reading `bridge -j fdb`", e))?
            .into_iter()
            .filter_map(|e| Some((e.mac, e.dst?)))
            .collect();
        let mut want: BTreeSet<(String, String)> = n
            .flood
            .iter()
            .map(|a| (ZERO_MAC.to_string(), a.to_string()))
            .collect();
        want.extend(n.macs.iter().map(|(m, a)| (m.clone(), a.to_string())));
        for (mac, dst) in have.difference(&want) {
            run("bridge", &["fdb", "del", mac, "dev", dev, "dst", dst]).await?;
        }
        for (mac, dst) in want.difference(&have) {
            let verb = if mac == ZERO_MAC { "append" } else { "replace" };
            run(
                "bridge",
                &[
                    "fdb",
                    verb,
                    mac,
                    "dev",
                    dev,
                    "dst",
                    dst,
                    "self",
                    "permanent",
                ],
            )
            .await?;
        }
        Ok(())
    }

    fn dnsmasq_file(&self, bridge: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("dnsmasq-{bridge}.{ext}"))
    }

    fn dnsmasq_args(&self, n: &NetPlan) -> Vec<String> {
        let cidr = corral_api::Cidr::parse(&n.cidr).ok();
        let mask = cidr.map(|c| c.netmask().to_string()).unwrap_or_default();
        let base = cidr.map(|c| c.base.to_string()).unwrap_or_default();
        let mut args = vec![
            "--conf-file=/dev/null".to_string(),
            format!(
                "--pid-file={}",
                self.dnsmasq_file(&n.bridge, "pid").display()
            ),
            format!(
                "--log-facility={}",
                self.dnsmasq_file(&n.bridge, "log").display()
            ),
            "--log-dhcp".into(),
            "--port=0".into(),
            format!("--interface={}", n.bridge),
            "--bind-interfaces".into(),
            "--except-interface=lo".into(),
            "--leasefile-ro".into(),
            "--dhcp-authoritative".into(),
            "--user=nobody".into(),
            "--group=nogroup".into(),
            format!("--dhcp-range={base},static,{mask},12h"),
            format!("--dhcp-option=option:mtu,{}", n.mtu),
            if n.nat {
                format!("--dhcp-option=option:router,{}", n.gateway)
            } else {
                "--dhcp-option=option:router".into()
            },
        ];
        args.extend(
            n.dhcp
                .iter()
                .map(|h| format!("--dhcp-host={},{},{}", h.mac, h.ip, h.name)),
        );
        args
    }

    /// Runs the network's dnsmasq with exactly these arguments (restarting it when they change).
    async fn ensure_dnsmasq(&self, n: &NetPlan) -> Result<(), NetError> {
        let args = self.dnsmasq_args(n);
        let text = args.join("\n");
        let args_file = self.dnsmasq_file(&n.bridge, "args");
        let running = dnsmasq_pid(&self.dnsmasq_file(&n.bridge, "pid"));
        if running.is_some() && std::fs::read_to_string(&args_file).ok().as_deref() == Some(&text) {
            return Ok(());
        }
        self.stop_dnsmasq(&n.bridge).await;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| NetError::io("creating the network state dir", e))?;
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        run("dnsmasq", &argv).await?;
        std::fs::write(&args_file, text)
            .map_err(|e| NetError::io("recording dnsmasq's arguments", e))
    }

    async fn stop_dnsmasq(&self, bridge: &str) {
        let pid_file = self.dnsmasq_file(bridge, "pid");
        if let Some(pid) = dnsmasq_pid(&pid_file) {
            signal(pid, libc::SIGTERM);
            for _ in 0..50 {
                if dnsmasq_pid(&pid_file).is_none() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            signal(pid, libc::SIGKILL);
        }
        for ext in ["pid", "args", "log"] {
            let _ = std::fs::remove_file(self.dnsmasq_file(bridge, ext));
        }
    }

    async fn remove_link(&self, name: &str) -> Result<(), NetError> {
        match ip(&["link", "del", name]).await {
            Ok(_) => Ok(()),
            Err(NetError::Command { message, .. }) if message.contains("Cannot find device") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// The pid in a dnsmasq pid file, if that process is alive and is dnsmasq with that pid file.
fn dnsmasq_pid(pid_file: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("dnsmasq") && cmdline.contains(&*pid_file.to_string_lossy())).then_some(pid)
}

#[async_trait]
impl NetDriver for LinuxNet {
    async fn apply(&self, plan: &HostPlan) -> Result<(), NetError> {
        let mut st = self.state.lock().await;
        let owns_nothing = st.owned == Owned::default();
        if plan.is_empty() && owns_nothing && st.ruleset.as_deref().unwrap_or_default().is_empty() {
            return Ok(());
        }
        if !plan.is_empty() {
            write_sysctl(
                "/proc/sys/net/bridge/bridge-nf-call-iptables",
                "1",
                "security groups need br_netfilter: run `modprobe br_netfilter`",
            )?;
        }
        if plan.forwarding {
            write_sysctl(
                "/proc/sys/net/ipv4/ip_forward",
                "1",
                "a network gateway needs IPv4 forwarding",
            )?;
        }
        let have = links().await?;
        // One network that cannot be made (say, a VLAN on a kernel without 802.1Q) must not
        // keep the others down: its NICs stay down, the rest goes on, the error is returned.
        let mut failed: Vec<(String, String, NetError)> = Vec::new();
        for n in &plan.networks {
            let made = async {
                self.ensure_network(&mut st, &have, n).await?;
                self.ensure_dnsmasq(n).await
            };
            if let Err(e) = made.await {
                failed.push((n.bridge.clone(), n.name.clone(), e));
            }
        }
        let working = |p: &&PortPlan| !failed.iter().any(|(b, _, _)| *b == p.bridge);
        for p in plan.ports.iter().filter(working) {
            self.ensure_tap(&mut st, &have, p).await?;
        }
        if st.ruleset.as_deref() != Some(plan.ruleset.as_str()) {
            if plan.ruleset.is_empty() {
                for family in ["bridge", "inet"] {
                    let _ = run("nft", &["delete", "table", family, TABLE]).await;
                }
            } else {
                run_input("nft", &["-f", "-"], Some(&plan.ruleset)).await?;
            }
            st.ruleset = Some(plan.ruleset.clone());
        }
        // Links come up only now that their rules are in place.
        let have = links().await?;
        for p in plan.ports.iter().filter(working) {
            if have.get(&p.tap).is_some_and(|l| !l.up()) {
                ip(&["link", "set", &p.tap, "up"]).await?;
            }
        }
        // What this driver made and the plan no longer has.
        let taps: BTreeSet<&String> = plan.ports.iter().map(|p| &p.tap).collect();
        let bridges: BTreeMap<&String, &NetPlan> =
            plan.networks.iter().map(|n| (&n.bridge, n)).collect();
        let uplinks: BTreeSet<&str> = plan
            .networks
            .iter()
            .map(|n| match &n.uplink {
                Uplink::Vxlan { dev, .. } | Uplink::Vlan { dev, .. } => dev.as_str(),
            })
            .collect();
        st.prepared.retain(|_, at| at.elapsed() < PREPARED_GRACE);
        for tap in st.owned.taps.clone().iter().filter(|t| !taps.contains(t)) {
            // A tap QEMU still holds, or one just made for a VM starting, waits for a later plan.
            if have.get(tap).is_some_and(Link::in_use) || st.prepared.contains_key(tap) {
                continue;
            }
            self.remove_link(tap).await?;
            st.owned.taps.remove(tap);
        }
        for dev in st
            .owned
            .uplinks
            .clone()
            .iter()
            .filter(|d| !uplinks.contains(d.as_str()))
        {
            self.remove_link(dev).await?;
            st.owned.uplinks.remove(dev);
        }
        for br in st
            .owned
            .bridges
            .clone()
            .iter()
            .filter(|b| !bridges.contains_key(b))
        {
            self.stop_dnsmasq(br).await;
            self.remove_link(br).await?;
            st.owned.bridges.remove(br);
        }
        self.save(&st.owned)?;
        match failed.into_iter().next() {
            Some((bridge, network, e)) => Err(NetError::Command {
                what: format!("making network {network} (bridge {bridge})"),
                message: e.to_string(),
            }),
            None => Ok(()),
        }
    }

    async fn prepare_ports(&self, ports: &[PortPlan]) -> Result<(), NetError> {
        let mut st = self.state.lock().await;
        let have = links().await?;
        for p in ports {
            self.ensure_bridge(&mut st, &have, &p.bridge, p.mtu).await?;
            self.ensure_uplink(&mut st, &have, &p.bridge, &p.uplink, p.mtu)
                .await?;
            self.ensure_tap(&mut st, &have, p).await?;
        }
        Ok(())
    }
}
