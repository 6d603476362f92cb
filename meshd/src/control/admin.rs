//! The admin socket for `meshctl`: one JSON request line, one JSON answer line.

use super::read_line_bounded;
use crate::device::Device;
use proto::admin::{Request, Response, MAX_MESSAGE_BYTES};
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

pub async fn serve(listener: UnixListener, dev: Arc<Device>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let dev = dev.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(stream, dev).await {
                        tracing::debug!(error = %e, "admin connection ended");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "admin accept failed"),
        }
    }
}

async fn session(stream: UnixStream, dev: Arc<Device>) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    while read_line_bounded(&mut rd, &mut line, MAX_MESSAGE_BYTES).await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Status) => Response::Status(dev.status()),
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
