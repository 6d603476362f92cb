//! meshd: a userspace WireGuard daemon. This file parses arguments, sets up logging and wires the
//! device to its control sockets and signals; nothing else.

mod control;
mod device;
mod drops;
mod peer;
mod privileges;
mod routing;

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Userspace WireGuard daemon of the mesh; configure it with `wg` or meshctl"
)]
struct Args {
    /// Stay in the foreground instead of detaching (as systemd and tests run it).
    #[arg(short = 'f', long)]
    foreground: bool,
    /// MTU of the interface in bytes.
    #[arg(long, default_value_t = 1420, value_parser = clap::value_parser!(u32).range(576..=65535))]
    mtu: u32,
    /// Name of the TUN interface to create (at most 15 bytes).
    #[arg(value_parser = parse_ifname)]
    ifname: String,
}

fn parse_ifname(s: &str) -> Result<String, String> {
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.foreground {
        return daemonize(&args);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dev = device::Device::create(&args.ifname, args.mtu)?;
    let uapi_path = PathBuf::from(control::uapi::socket_path(&args.ifname));
    let admin_path = PathBuf::from(proto::admin::socket_path(&args.ifname));
    let _files = control::SocketFiles;
    let uapi = control::bind_socket(&uapi_path)?;
    control::remove_at_exit(uapi_path.clone());
    let admin = control::bind_socket(&admin_path)?;
    control::remove_at_exit(admin_path.clone());
    privileges::drop_unneeded().context("dropping capabilities")?;
    tracing::info!(
        interface = %args.ifname,
        mtu = args.mtu,
        uapi = %uapi_path.display(),
        admin = %admin_path.display(),
        "meshd up"
    );

    tokio::spawn(control::uapi::serve(uapi, dev.clone()));
    tokio::spawn(control::admin::serve(admin, dev.clone()));
    tokio::spawn(device::run_timers(dev.clone()));

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    // `_files` removes the sockets; the TUN interface goes away when the process closes it.
    Ok(())
}

/// Starts a detached copy of meshd in the foreground mode and returns once its UAPI socket is up,
/// as wireguard-go does, so `meshd wg0 && wg set wg0 ...` works in a script.
fn daemonize(args: &Args) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the meshd executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--foreground")
        .arg("--mtu")
        .arg(args.mtu.to_string())
        .arg(&args.ifname);
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
    let socket = control::uapi::socket_path(&args.ifname);
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
