//! `corral up` and `corral controller`: the server side of the binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use corral_agent::{Agent, AgentConfig};
use corral_hypervisor::{detect_accel, AccelChoice, QemuDriver};
use corral_store::{RedbStore, Store};

use crate::client::{config_path, write_private, ClientConfig, DEFAULT_LISTEN};

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Where state, images and VM disks live (default: $XDG_DATA_HOME/corral or ~/.local/share/corral).
    #[arg(long, env = "CORRAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address the API listens on.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Address of the agent endpoint (mutually authenticated TLS) that hosts join, e.g. 0.0.0.0:7443.
    #[arg(long)]
    agent_listen: Option<SocketAddr>,
    /// Names and addresses agents use to reach the agent endpoint (put in its certificate),
    /// comma-separated; the listen address, 127.0.0.1 and localhost are always included.
    #[arg(long, value_delimiter = ',')]
    advertise: Vec<String>,
}

/// How this machine runs guests as a host of the cluster (`up` and `agent`).
#[derive(Args, Debug)]
pub struct HostArgs {
    /// Accelerator: auto uses KVM only where the CPU has hardware virtualization.
    #[arg(long, default_value = "auto")]
    accel: AccelChoice,
    /// Name of this host in the cluster (default: the machine's host name).
    #[arg(long)]
    host_name: Option<String>,
    /// Seconds a guest gets to shut down after the ACPI power button before it is powered off.
    #[arg(long, default_value_t = 30)]
    stop_timeout: u64,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Args, Debug)]
pub struct ControllerArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Simulated hosts run in the controller's process (scale tests; see `corral agent --simulate`
    /// for simulated hosts that join over the network).
    #[command(flatten)]
    sim: SimArgs,
}

/// Simulated hosts: fake hypervisor hosts that take VMs through the agent protocol without QEMU.
#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// Number of simulated hosts, named PREFIX-1 .. PREFIX-N (0: none).
    #[arg(long, default_value_t = 0)]
    sim_hosts: u32,
    /// Name prefix of the simulated hosts.
    #[arg(long, default_value = "sim")]
    sim_prefix: String,
    /// CPUs of each simulated host.
    #[arg(long, default_value_t = 32)]
    sim_cpus: u32,
    /// Memory of each simulated host, e.g. 256G.
    #[arg(long, default_value = "256G")]
    sim_memory: String,
    /// CPU demand of the VMs by name prefix: "hot-=0.9,=sine:0.1-0.5/300" (a fraction of the vCPUs,
    /// or a sine between two fractions with a period in seconds); unmatched VMs idle at 0.05;
    /// "none" reports no usage.
    #[arg(long, default_value = "")]
    sim_load: String,
    /// Chance (0 to 1) that a VM start fails (fault injection).
    #[arg(long, default_value_t = 0.0)]
    sim_fail_starts: f64,
    /// Chance (0 to 1) that a live migration fails, at the target's preparation or at the copy.
    #[arg(long, default_value_t = 0.0)]
    sim_fail_migrations: f64,
    /// How long a simulated guest takes to start (and a host to wake), in milliseconds.
    #[arg(long, default_value_t = 500)]
    sim_boot_ms: u64,
    /// Seconds between rewrites of each simulated host's record (a real agent: 30; the hosts
    /// report to the failure detector four times a second besides).
    #[arg(long, default_value_t = 30)]
    sim_heartbeat: u64,
    /// A file naming the simulated hosts to keep dead, one per line (read every half second;
    /// `corral lab fault` writes it): a dead host stops heartbeating, reporting and acting.
    #[arg(long)]
    sim_faults: Option<PathBuf>,
}

impl SimArgs {
    fn names(&self) -> Result<Vec<String>> {
        (1..=self.sim_hosts)
            .map(|i| {
                let name = format!("{}-{i}", self.sim_prefix);
                corral_api::validate_name("host", &name)?;
                Ok(name)
            })
            .collect()
    }

    fn spec(&self, address: std::net::IpAddr) -> Result<corral_sim::SimSpec> {
        let chance = |what: &str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(p)
            } else {
                anyhow::bail!("{what} {p} is not a chance from 0 to 1")
            }
        };
        let load = if self.sim_load.is_empty() {
            Default::default()
        } else {
            self.sim_load.parse().map_err(anyhow::Error::msg)?
        };
        let capacity = corral_api::Capacity {
            cpus: self.sim_cpus,
            memory_bytes: corral_api::parse_size("--sim-memory", &self.sim_memory)?,
        };
        // The controller refuses what no machine has, from simulated hosts too.
        capacity
            .check()
            .map_err(|e| anyhow::anyhow!("--sim-cpus/--sim-memory: {e}"))?;
        Ok(corral_sim::SimSpec {
            cpus: capacity.cpus,
            memory_bytes: capacity.memory_bytes,
            address,
            boot: Duration::from_millis(self.sim_boot_ms),
            fail_starts: chance("--sim-fail-starts", self.sim_fail_starts)?,
            fail_migrations: chance("--sim-fail-migrations", self.sim_fail_migrations)?,
            loads: load,
            memory_use: 0.5,
            heartbeat: Duration::from_secs(self.sim_heartbeat.clamp(1, 60)),
            ..Default::default()
        })
    }

    /// Runs the fleet (and follows the faults file) in the background.
    fn spawn(&self, spec: corral_sim::SimSpec, hosts: Vec<corral_sim::SimHost>, data_dir: PathBuf) {
        let fleet = corral_sim::Fleet::new(spec, hosts, data_dir);
        if let Some(f) = &self.sim_faults {
            tokio::spawn(fleet.clone().follow_faults(f.clone()));
        }
        tokio::spawn(fleet.run());
    }
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".local/share")
        })
        .join("corral")
}

fn host_name(given: Option<String>) -> Result<String> {
    let name = given.unwrap_or_else(|| {
        let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_lowercase();
        if corral_api::validate_name("host", &h).is_ok() {
            h
        } else {
            "local".into()
        }
    });
    corral_api::validate_name("host", &name)?;
    Ok(name)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("CORRAL_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Opens the store, prepares the controller and serves the API until Ctrl-C or SIGTERM.
async fn serve(
    args: &ServerArgs,
    agent: Option<(AccelChoice, String, Duration)>,
    sim: Option<&SimArgs>,
) -> Result<()> {
    // State, disks and the token live here: owner only.
    let data_dir = private_data_dir(&args.data_dir.clone().unwrap_or_else(default_data_dir))?;
    let store: Arc<dyn Store> = Arc::new(
        RedbStore::open(&data_dir.join("store.redb"))
            .context("opening the store (is another `corral up` using this data dir?)")?,
    );
    if data_dir.to_string_lossy().contains(',') {
        anyhow::bail!("the data dir {} contains a comma, which QEMU options cannot carry: pick another --data-dir", data_dir.display());
    }
    // The admin token file is the source of truth; it is written (atomically) before its hash is
    // stored, so a crash in between cannot lock the operator out.
    let token_file = data_dir.join("admin-token");
    let token = match std::fs::read_to_string(&token_file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let t = corral_controller::new_token();
            write_private(&token_file, format!("{t}\n").as_bytes())?;
            t
        }
    };
    let images = Arc::new(corral::HostImages {
        data_dir: data_dir.clone(),
    });
    let ctx = corral_controller::init(store.clone(), data_dir.clone(), images, &token).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is Corral already running? use --listen)",
                args.listen
            )
        })?;
    let url = format!("http://{}", listener.local_addr()?);
    let cfg = ClientConfig {
        url: url.clone(),
        token,
    };
    write_private(&config_path(), &serde_json::to_vec_pretty(&cfg)?)?;
    if let Some(addr) = args.agent_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for agents (--agent-listen)"))?;
        let bound = listener.local_addr()?;
        let mut names = args.advertise.clone();
        if !bound.ip().is_unspecified() {
            names.push(bound.ip().to_string());
        }
        names.extend(["127.0.0.1".to_string(), "localhost".to_string()]);
        names.dedup();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = corral_controller::agents::serve(ctx, names, listener).await {
                tracing::error!(error = %e, "the agent endpoint stopped");
            }
        });
        println!("  agents join: https://{bound} (see `corral host join-token`)");
    }
    if let Some((accel, host, stop_timeout)) = agent {
        let accel =
            detect_accel(accel).map_err(|e| anyhow::anyhow!("{e}: use --accel tcg or auto"))?;
        let hypervisor = corral_hypervisor::qemu_version().await?;
        // Where hosts that join this one reach it for migrations: the first advertised address,
        // else loopback (the all-in-one alone has nowhere to migrate to).
        let address: std::net::IpAddr = args
            .advertise
            .iter()
            .find_map(|a| a.parse().ok())
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
        let cfg = AgentConfig {
            host,
            data_dir: data_dir.clone(),
            accel,
            hypervisor,
            stop_timeout,
            resync: Duration::from_secs(5),
            // Where hosts that join this one reach it for migrations: the first advertised
            // address, else loopback (the all-in-one alone has nowhere to migrate to).
            address,
            ha: Default::default(),
            network: Arc::new(corral_network::LinuxNet::new(data_dir.join("net"), address)),
        };
        let link = corral::LocalHaLink {
            ctx: ctx.clone(),
            host: cfg.host.clone(),
        };
        let local = corral_controller::LocalHost::register(store.clone(), &cfg.host).await?;
        let agent = Agent::new(
            Arc::new(local),
            Arc::new(QemuDriver),
            cfg,
            Some(Arc::new(link)),
        );
        tokio::spawn(async move {
            if let Err(e) = agent.run().await {
                tracing::error!(error = %e, "the host agent stopped");
            }
        });
        println!("accelerator: {accel}");
    }
    if let Some(sim) = sim.filter(|s| s.sim_hosts > 0) {
        let mut hosts = Vec::new();
        for name in sim.names()? {
            let local = corral_controller::LocalHost::register(store.clone(), &name).await?;
            hosts.push(corral_sim::SimHost {
                store: Arc::new(local),
                ha: Some(Arc::new(corral::LocalHaLink {
                    ctx: ctx.clone(),
                    host: name.clone(),
                })),
                name,
            });
        }
        let spec = sim.spec(std::net::Ipv4Addr::LOCALHOST.into())?;
        sim.spawn(spec, hosts, private_data_dir(&data_dir.join("sim"))?);
        println!(
            "  simulated hosts: {} ({}-1 ..)",
            sim.sim_hosts, sim.sim_prefix
        );
    }
    println!("Corral is up.");
    println!("  API:         {url}/api/v1");
    println!("  admin token: {}", token_file.display());
    println!("  data dir:    {}", data_dir.display());
    println!(
        "  client config: {} (CLI commands use it)",
        config_path().display()
    );
    println!("Ctrl-C stops the control plane; running VMs keep running.");
    axum::serve(listener, corral_controller::router(ctx.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the API")?;
    println!("Corral stopped; VMs were left running and will be adopted on the next start.");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub fn up(args: UpArgs) -> Result<()> {
    init_logging();
    let host = host_name(args.host.host_name)?;
    runtime()?.block_on(serve(
        &args.server,
        Some((
            args.host.accel,
            host,
            Duration::from_secs(args.host.stop_timeout),
        )),
        None,
    ))
}

pub fn controller(args: ControllerArgs) -> Result<()> {
    init_logging();
    runtime()?.block_on(serve(&args.server, None, Some(&args.sim)))
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The controller's agent endpoint, e.g. https://10.0.0.1:7443.
    #[arg(long)]
    join: String,
    /// Join token from `corral host join-token` (needed only the first time).
    #[arg(long, env = "CORRAL_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the join token (with --simulate, one per line), instead of --token.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Where this host keeps its certificate, VM disks and run directories.
    #[arg(long, env = "CORRAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// This host's address on the fabric, where VMs migrating here are received; by default the
    /// address this machine reaches the controller from.
    #[arg(long)]
    address: Option<std::net::IpAddr>,
    #[command(flatten)]
    host: HostArgs,
    /// Run simulated hosts instead of this machine's hypervisor: --host-name alone, or
    /// --sim-hosts of them, each joining with its own certificate (--token then takes one token per
    /// host, comma-separated).
    #[arg(long)]
    simulate: bool,
    #[command(flatten)]
    sim: SimArgs,
}

/// The local address this machine uses to reach the controller at `url` (no packet is sent).
fn address_toward(url: &str) -> Result<std::net::IpAddr> {
    let authority = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    let remote = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| format!("cannot resolve {authority}: pass --address"))?;
    let local: std::net::SocketAddr = if remote.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket
        .connect(remote)
        .with_context(|| format!("no route to {remote}: pass --address"))?;
    Ok(socket.local_addr()?.ip())
}

fn private_data_dir(dir: &std::path::Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(dir.canonicalize()?)
}

/// The host's credentials from `data_dir`, or from joining with `token` the first time.
fn credentials(
    url: &str,
    token: Option<&str>,
    host: &str,
    data_dir: &std::path::Path,
) -> Result<corral_agent::remote::Credentials> {
    match corral_agent::remote::Credentials::load(data_dir) {
        Some(c) if c.host != host => anyhow::bail!(
            "{} holds the certificate of host {}: run with --host-name {} (or another --data-dir to join as {host})",
            data_dir.display(),
            c.host,
            c.host
        ),
        Some(c) => Ok(c),
        None => {
            let token = token.context(
                "this host has not joined yet: pass --token from `corral host join-token` on the controller",
            )?;
            // The CLI's hint: the flags that name the controller and the token.
            let c = corral_agent::remote::join(url, token, host, data_dir).map_err(|e| {
                anyhow::anyhow!("{e} (check --join, and --token from `corral host join-token`)")
            })?;
            println!("joined {url} as host {host}");
            Ok(c)
        }
    }
}

/// Runs simulated hosts that join a controller like real ones, each with its own certificate.
fn simulated_agents(args: AgentArgs, data_dir: PathBuf) -> Result<()> {
    let names = if args.sim.sim_hosts > 0 {
        args.sim.names()?
    } else {
        vec![host_name(args.host.host_name.clone())?]
    };
    let tokens: Vec<&str> = args.token.as_deref().map_or(Vec::new(), |t| {
        t.split([',', '\n']).map(str::trim).collect()
    });
    let mut joined = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let dir = private_data_dir(&data_dir.join("sim").join(name))?;
        let token = tokens.get(i).copied().filter(|t| !t.is_empty());
        let creds = credentials(&args.join, token, name, &dir).with_context(|| {
            format!(
                "simulated host {name} (token {} of {})",
                i + 1,
                tokens.len()
            )
        })?;
        joined.push((name.clone(), creds));
    }
    let address = match args.address {
        Some(a) => a,
        None => address_toward(&args.join)?,
    };
    let spec = args.sim.spec(address)?;
    runtime()?.block_on(async move {
        let mut hosts = Vec::new();
        for (name, creds) in joined {
            let store = Arc::new(corral_agent::remote::RemoteStore::new(&args.join, &creds)?);
            let link: Arc<dyn corral_agent::ha::HaLink> = store.clone();
            hosts.push(corral_sim::SimHost {
                name,
                store,
                ha: Some(link),
            });
        }
        println!(
            "{} simulated host(s) running; Ctrl-C stops them",
            hosts.len()
        );
        args.sim.spawn(spec, hosts, data_dir.join("sim"));
        shutdown_signal().await;
        Ok(())
    })
}

/// Runs a host agent that joins (or rejoins) a controller over mutually authenticated TLS.
pub fn agent(mut args: AgentArgs) -> Result<()> {
    init_logging();
    if let Some(f) = &args.token_file {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("reading the join token from {}", f.display()))?;
        args.token = Some(t.trim().to_string());
    }
    let data_dir = private_data_dir(&args.data_dir.clone().unwrap_or_else(default_data_dir))?;
    if args.simulate {
        return simulated_agents(args, data_dir);
    }
    let host = host_name(args.host.host_name)?;
    let creds = credentials(&args.join, args.token.as_deref(), &host, &data_dir)?;
    let store = corral_agent::remote::RemoteStore::new(&args.join, &creds)?;
    let accel = detect_accel(args.host.accel)
        .map_err(|e| anyhow::anyhow!("{e}: use --accel tcg or auto"))?;
    let address = match args.address {
        Some(a) => a,
        None => address_toward(&args.join)?,
    };
    runtime()?.block_on(async move {
        let hypervisor = corral_hypervisor::qemu_version().await?;
        let cfg = AgentConfig {
            host: host.clone(),
            network: Arc::new(corral_network::LinuxNet::new(data_dir.join("net"), address)),
            data_dir,
            accel,
            hypervisor,
            stop_timeout: Duration::from_secs(args.host.stop_timeout),
            resync: Duration::from_secs(5),
            address,
            ha: Default::default(),
        };
        let store = Arc::new(store);
        let link: Arc<dyn corral_agent::ha::HaLink> = store.clone();
        let agent = Agent::new(store, Arc::new(QemuDriver), cfg, Some(link));
        println!("host agent {host} running ({accel}); Ctrl-C stops it, VMs keep running");
        tokio::select! {
            r = agent.run() => r.map_err(anyhow::Error::from),
            _ = shutdown_signal() => Ok(()),
        }
    })
}
