//! The admin socket for `meshctl`: one JSON request line, one JSON answer line.

use super::read_line_bounded;
use crate::device::Device;
use crate::mesh::run::MemberView;
use proto::admin::{Request, Response, MAX_MESSAGE_BYTES};
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

pub async fn serve(
    listener: UnixListener,
    dev: Arc<Device>,
    members: MemberView,
    me: Option<String>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (dev, members, me) = (dev.clone(), members.clone(), me.clone());
                tokio::spawn(async move {
                    if let Err(e) = session(stream, dev, members, me).await {
                        tracing::debug!(error = %e, "admin connection ended");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "admin accept failed"),
        }
    }
}

async fn session(
    stream: UnixStream,
    dev: Arc<Device>,
    members: MemberView,
    me: Option<String>,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    while read_line_bounded(&mut rd, &mut line, MAX_MESSAGE_BYTES).await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Status) => {
                let mut status = dev.status();
                status.identity = me.clone();
                let members = members.lock();
                for p in &mut status.peers {
                    let key = proto::Key::from_base64(&p.public_key)
                        .map(|k| k.0)
                        .unwrap_or_default();
                    if let Some(m) = members.get(&key) {
                        p.identity = Some(m.certificate.body.identity());
                        p.labels = m.certificate.body.labels.clone();
                        p.cert_not_after = Some(m.certificate.body.not_after);
                    }
                }
                Response::Status(status)
            }
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut text = serde_json::to_string(&response).map_err(std::io::Error::other)?;
        text.push('\n');
        wr.write_all(text.as_bytes()).await?;
    }
    Ok(())
}
