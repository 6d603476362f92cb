//! meshd: a userspace WireGuard daemon. This file parses arguments, sets up logging and wires the
//! device to its control sockets and signals; nothing else.

mod allocs;
mod api;
mod config;
mod device;
mod drops;
mod enforce;
mod forwarding;
mod mesh;
mod netlink;
mod notify;
mod peer;
mod privileges;
mod routing;

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The version and the git commit built from (`meshd --version`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MESH_GIT_COMMIT"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    version = VERSION,
    about = "Userspace WireGuard daemon of the mesh; configure it with `wg` or meshctl"
)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["ifname", "config", "check_config", "man"])))]
struct Args {
    /// Stay in the foreground instead of detaching (as systemd and tests run it).
    #[arg(short = 'f', long)]
    foreground: bool,
    /// MTU of the interface in bytes.
    #[arg(long, default_value_t = 1420, value_parser = clap::value_parser!(u32).range(576..=65535))]
    mtu: u32,
    /// Run in mesh mode from this configuration file (TOML; see the README).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate a mesh-mode configuration file and the files it names, then exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Log lines as `text` (colour only on a terminal) or `json` (one object per line); default:
    /// the configuration's `log_format`, else text.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<config::LogFormat>,
    /// Print the man page (roff, section 8) and exit.
    #[arg(long, hide = true)]
    man: bool,
    /// Segmentation and coalescing offloads on the TUN device and the UDP socket (`on`, where
    /// the kernel has them) or none (`off`: one packet per system call, as before).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    offloads: bool,
    /// Name of the TUN interface to create (at most 15 bytes).
    #[arg(value_parser = parse_ifname)]
    ifname: Option<String>,
}

/// `on` or `off`. The environment variable MESHD_OFFLOADS, when set, wins over `--offloads`
/// (so tests and units can turn offloads off without another command line).
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("`{s}` is neither on nor off")),
    }
}

pub(crate) fn parse_ifname(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not an interface name (1 to 15 letters, digits, - _ .)"
        ))
    }
}

fn main() -> std::process::ExitCode {
    // Everything meshd creates (sockets, the state directory, the flow log) is its owner's alone
    // from the moment it exists, not after a chmod.
    // SAFETY: umask(2) has no preconditions and cannot fail.
    unsafe { libc::umask(0o077) };
    let args = Args::parse();
    if args.man {
        use clap::CommandFactory;
        let page = clap_mangen::Man::new(Args::command().name("meshd")).section("8");
        return match page.render(&mut std::io::stdout()) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshd: writing the man page: {e}");
                std::process::ExitCode::from(1)
            }
        };
    }
    if let Some(path) = &args.check_config {
        return match check_config(path) {
            Ok(summary) => {
                println!("{summary}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshd: {e:#}");
                std::process::ExitCode::from(1)
            }
        };
    }
    match start(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Checks a configuration file and everything it names; returns a one-paragraph summary.
pub(crate) fn read_config(
    path: &std::path::Path,
) -> anyhow::Result<(config::Config, config::Identity)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = config::Config::parse(&text, path)?;
    let id = config::load(&cfg, mesh::run::now_ms() / 1000)?;
    Ok((cfg, id))
}

fn check_config(path: &std::path::Path) -> anyhow::Result<String> {
    let (cfg, id) = read_config(path)?;
    let now = mesh::run::now_ms() / 1000;
    let body = &id.certificate.body;
    Ok(format!(
        "{}: OK\n  interface {} port {} mtu {}\n  identity {} serial {}, expires {} ({} left)\n  public key {} (the private key matches the certificate)\n  {} trusted CA(s), {} revocation list(s), {} seed(s) ({} by key), probes {}, state in {}\n  policy: posture {}, audit {}, {} policy admin(s), up to {} tracked flows{}",
        path.display(),
        cfg.interface.name,
        cfg.interface.listen_port,
        cfg.interface.mtu,
        body.identity(),
        body.serial,
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_secs(body.not_after)
        ),
        humantime::format_duration(Duration::from_secs(body.not_after.saturating_sub(now))),
        id.private_key.public(),
        id.bundle.len(),
        id.revocation_lists.len(),
        cfg.seeds().len(),
        cfg.seeds().iter().filter(|s| s.key.is_some()).count(),
        if cfg.peering.answer_probes {
            "answered"
        } else {
            "ignored"
        },
        cfg.peering.state_dir.display(),
        match cfg.policy.posture {
            config::PostureSetting::ZeroTrust => "zero-trust",
            config::PostureSetting::Calico => "calico",
        },
        if cfg.policy.audit { "on" } else { "off" },
        id.policy_admins.len(),
        cfg.policy.conntrack_max,
        match cfg.metrics.listen {
            Some(a) => format!("\n  metrics at http://{a}/metrics, /healthz, /readyz"),
            None => String::new(),
        },
    ))
}

/// The log format: the command line's, else the configuration file's (read again, in full, by
/// `run`, which reports any error in it), else text.
fn log_format(args: &Args) -> config::LogFormat {
    args.log_format.unwrap_or_else(|| {
        args.config
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|text| config::Config::parse(&text, std::path::Path::new("")).ok())
            .map(|c| c.log_format)
            .unwrap_or_default()
    })
}

/// Log lines to standard error: text, with colour only when it is a terminal (a file or the
/// journal gets no escape codes), or one JSON object per line.
fn init_logging(format: config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        config::LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
        config::LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
}

fn start(args: Args) -> anyhow::Result<()> {
    if !args.foreground {
        return daemonize(&args);
    }
    // Before any thread exists: on Linux capabilities are per thread, and every thread started
    // later (the packet loops, the flow log, the runtime's) inherits this thread's sets.
    privileges::drop_unneeded().context("dropping capabilities")?;
    init_logging(log_format(&args));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(args))
}

/// `--offloads`, unless MESHD_OFFLOADS says otherwise.
fn offloads_wanted(args: &Args) -> anyhow::Result<bool> {
    match std::env::var("MESHD_OFFLOADS") {
        Ok(v) => parse_on_off(&v).map_err(|e| anyhow::anyhow!("MESHD_OFFLOADS: {e}")),
        Err(_) => Ok(args.offloads),
    }
}

#[global_allocator]
static ALLOCATOR: allocs::Counting = allocs::Counting;

async fn run(args: Args) -> anyhow::Result<()> {
    let mesh_config = match &args.config {
        Some(path) => Some(read_config(path)?),
        None => None,
    };
    let (ifname, mtu) = match &mesh_config {
        Some((cfg, _)) => (cfg.interface.name.clone(), cfg.interface.mtu),
        None => (args.ifname.clone().context("no interface name")?, args.mtu),
    };
    let dev = device::Device::create(&ifname, mtu, offloads_wanted(&args)?)?;
    let uapi_path = PathBuf::from(api::uapi::socket_path(&ifname));
    let admin_path = PathBuf::from(proto::admin::socket_path(&ifname));
    let _files = api::SocketFiles;
    let uapi = api::bind_socket(&uapi_path)?;
    api::remove_at_exit(uapi_path.clone());
    let admin = api::bind_socket(&admin_path)?;
    api::remove_at_exit(admin_path.clone());
    let members = mesh::run::MemberView::default();
    let mut me = None;
    let mut me_spiffe = None;
    let mut metrics = None;
    let mut mesh_task = None;
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(16);
    if let Some((cfg, id)) = mesh_config {
        if let Some(addr) = cfg.metrics.listen {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("binding the metrics listener [metrics] listen = {addr}")
            })?;
            metrics = Some((addr, listener));
        }
        me = Some(id.certificate.body.identity());
        me_spiffe = Some(id.certificate.body.spiffe_id());
        let (tx, rx) = tokio::sync::mpsc::channel(mesh::run::CONTROL_BACKLOG);
        dev.set_control_sink(tx);
        let path = args
            .config
            .clone()
            .context("mesh mode without a config path")?;
        if cfg.reload_on_change {
            tokio::spawn(mesh::watch::run(path.clone(), reload_tx.clone()));
        }
        let mesh = mesh::run::Mesh::start(dev.clone(), path, &cfg, id, members.clone()).await?;
        mesh_task = Some(tokio::spawn(mesh.run(rx, reload_rx)));
    }
    tracing::info!(
        interface = %ifname,
        mtu,
        identity = me.as_deref().unwrap_or("-"),
        uapi = %uapi_path.display(),
        admin = %admin_path.display(),
        "meshd up"
    );

    tokio::spawn(api::uapi::serve(uapi, dev.clone()));
    let admin_state = api::admin::Admin {
        dev: dev.clone(),
        members,
        me,
        me_spiffe,
        commands: reload_tx.clone(),
    };
    if let Some((addr, listener)) = metrics {
        tracing::info!(listen = %addr, "metrics at /metrics, health at /healthz and /readyz");
        tokio::spawn(api::http::serve(listener, admin_state.clone(), VERSION));
    }
    tokio::spawn(api::admin::serve(admin, admin_state));
    tokio::spawn(device::run_timers(dev.clone()));

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    notify::notify(&format!("READY=1\nSTATUS={ifname} up"));
    // The mesh task never ends; if it does (a panic), the node no longer follows the mesh and
    // must not look alive: exit, so systemd or the kubelet restarts it from its state.
    let mesh_ended = async {
        match mesh_task {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(mesh_ended);
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
            ended = &mut mesh_ended => {
                tracing::error!(outcome = ?ended, "the mesh task ended; exiting");
                notify::notify("STOPPING=1");
                anyhow::bail!("the mesh task ended: {ended:?}");
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                if args.config.is_none() {
                    tracing::warn!("SIGHUP ignored: not in mesh mode");
                    continue;
                }
                // Queued behind other commands, never dropped because status requests are many.
                let tx = reload_tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(mesh::run::Command::Reload { reply: None }).await;
                });
            }
        }
    }
    notify::notify("STOPPING=1");
    // `_files` removes the sockets; the TUN interface goes away when the process closes it.
    Ok(())
}

/// Starts a detached copy of meshd in the foreground mode and returns once its UAPI socket is up,
/// as wireguard-go does, so `meshd wg0 && wg set wg0 ...` works in a script.
fn daemonize(args: &Args) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the meshd executable")?;
    let ifname = match (&args.config, &args.ifname) {
        (Some(path), _) => read_config(path)?.0.interface.name,
        (None, Some(name)) => name.clone(),
        (None, None) => anyhow::bail!("no interface name"),
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--foreground").args(std::env::args_os().skip(1));
    // Detached, it must not hold the caller's terminal or pipes open; run with --foreground
    // (as systemd does) to see its log.
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe and the only call made between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the meshd daemon")?;
    let socket = api::uapi::socket_path(&ifname);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("meshd exited during start-up ({status})");
        }
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("meshd did not open {socket} within 10 s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_flag_takes_on_or_off_and_defaults_to_on() {
        let parse = |a: &[&str]| Args::try_parse_from([&["meshd"], a].concat());
        assert!(parse(&["wg0"]).unwrap().offloads);
        assert!(parse(&["--offloads", "on", "wg0"]).unwrap().offloads);
        assert!(!parse(&["--offloads", "off", "wg0"]).unwrap().offloads);
        let e = parse(&["--offloads", "maybe", "wg0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`maybe` is neither on nor off"), "{e}");
    }
}
