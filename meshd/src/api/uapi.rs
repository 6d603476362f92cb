//! The WireGuard cross-platform UAPI server on `/var/run/wireguard/IFNAME.sock`, so the stock
//! `wg` tool configures and inspects meshd as it does wireguard-go.

use super::read_line_bounded;
use crate::device::Device;
use proto::uapi::{self, MAX_LINE_BYTES, MAX_REQUEST_BYTES};
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

pub const SOCKET_DIR: &str = "/var/run/wireguard";

pub fn socket_path(ifname: &str) -> String {
    format!("{SOCKET_DIR}/{ifname}.sock")
}

pub async fn serve(listener: UnixListener, dev: Arc<Device>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let dev = dev.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(stream, dev).await {
                        tracing::debug!(error = %e, "UAPI connection ended");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "UAPI accept failed"),
        }
    }
}

async fn session(stream: UnixStream, dev: Arc<Device>) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    while read_line_bounded(&mut rd, &mut line, MAX_LINE_BYTES).await? {
        match line.as_str() {
            "get=1" => {
                // The request ends with an empty line.
                read_line_bounded(&mut rd, &mut line, MAX_LINE_BYTES).await?;
                let text = uapi::format_get(&dev.info());
                wr.write_all(text.as_bytes()).await?;
            }
            "set=1" => {
                let mut body = String::new();
                loop {
                    if !read_line_bounded(&mut rd, &mut line, MAX_LINE_BYTES).await? {
                        return Ok(());
                    }
                    if line.is_empty() {
                        break;
                    }
                    if body.len() + line.len() > MAX_REQUEST_BYTES {
                        wr.write_all(format!("errno={}\n\n", uapi::EPROTO).as_bytes())
                            .await?;
                        return Ok(());
                    }
                    body.push_str(&line);
                    body.push('\n');
                }
                let errno = match uapi::parse_set(&body).and_then(|req| dev.apply(&req)) {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::warn!(error = %e, "UAPI set refused");
                        e.errno
                    }
                };
                wr.write_all(format!("errno={errno}\n\n").as_bytes())
                    .await?;
            }
            "" => continue,
            other => {
                tracing::debug!(request = other, "unknown UAPI request");
                wr.write_all(format!("errno={}\n\n", uapi::EPROTO).as_bytes())
                    .await?;
                return Ok(());
            }
        }
    }
    Ok(())
}
