//! `meshctl peer`: operator-driven peering on a mesh-mode daemon.

use crate::status::request;
use crate::{Failure, Output};
use anyhow::anyhow;
use proto::admin::{self, Request, Response};
use std::path::{Path, PathBuf};

/// The admin socket: the interface's, or the only meshd running.
pub fn socket(ifname: Option<&str>, socket: Option<PathBuf>) -> Result<PathBuf, Failure> {
    if let Some(s) = socket {
        return Ok(s);
    }
    if let Some(name) = ifname {
        return Ok(PathBuf::from(admin::socket_path(name)));
    }
    let dir = Path::new(admin::SOCKET_DIR);
    let socks: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow!("no meshd is running ({}: {e})", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    match socks.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(anyhow!("no meshd is running (no socket in {})", dir.display()).into()),
        many => Err(Failure::input(anyhow!(
            "{} daemons are running; name one with -i IFNAME",
            many.len()
        ))),
    }
}

pub fn done(resp: Response) -> Result<(), Failure> {
    match resp {
        Response::Done { message } => {
            println!("{message}");
            Ok(())
        }
        Response::Error { message } => Err(anyhow!("meshd refused: {message}").into()),
        other => Err(anyhow!("unexpected answer {other:?}").into()),
    }
}

pub fn add(path: &Path, endpoint: &str) -> Result<(), Failure> {
    endpoint
        .parse::<proto::control::Seed>()
        .map_err(|e| Failure::input(anyhow!("{e}")))?;
    done(request(
        path,
        &Request::PeerAdd {
            endpoint: endpoint.to_string(),
        },
    )?)
}

pub fn remove(path: &Path, id: &str) -> Result<(), Failure> {
    done(request(path, &Request::PeerRemove { id: id.to_string() })?)
}

pub fn list(path: &Path, output: Output) -> Result<(), Failure> {
    let peers = match request(path, &Request::PeerList)? {
        Response::Peers(p) => p,
        Response::Error { message } => return Err(anyhow!("meshd refused: {message}").into()),
        other => return Err(anyhow!("unexpected answer {other:?}").into()),
    };
    if let Some(wide) = output.data(&peers)? {
        print!(
            "{:<36}  {:<22}  {:<18}  {:<44}  ",
            "IDENTITY", "ENDPOINT", "ADDRESSES", "PUBLIC KEY"
        );
        if wide {
            print!("{:>8}  {:<20}  ", "SERIAL", "EXPIRES");
        }
        println!("LABELS");
        for p in &peers {
            let addrs: Vec<String> = p.addrs.iter().map(|a| a.to_string()).collect();
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            print!(
                "{:<36}  {:<22}  {:<18}  {:<44}  ",
                p.identity,
                p.endpoint,
                addrs.join(","),
                p.public_key,
            );
            if wide {
                print!(
                    "{:>8}  {:<20}  ",
                    p.serial,
                    crate::identity::utc(p.not_after)
                );
            }
            println!(
                "{}",
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels.join(",")
                }
            );
            // The workload identities in force behind it, one line each.
            for w in &p.workloads {
                println!(
                    "  + {:<32}  {:<22}  until {}",
                    w.identity,
                    proto::cert::list(&w.addresses),
                    crate::identity::utc(w.not_after)
                );
            }
        }
    }
    Ok(())
}
