//! The metrics listener (`[metrics] listen`): `GET /metrics`, `/healthz` and `/readyz` over
//! HTTP/1.1, one request per connection. It is a network parser, so it is bounded: a request head
//! of at most [`MAX_HEAD_BYTES`], read within [`READ_TIMEOUT`], at most [`MAX_CONNECTIONS`] at once
//! (one more is told 503 at once). The node's status is taken at most once per [`STATUS_TTL`]
//! however many scrape, so a flood of requests costs the mesh task nothing more.
//!
//! Anyone who can reach the listener can hold its connections: the DaemonSet's liveness probe
//! therefore asks the admin socket (`meshctl status`), not this listener.

use super::admin::Admin;
use super::metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const MAX_HEAD_BYTES: usize = 4096;
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
pub const MAX_CONNECTIONS: usize = 16;
pub const STATUS_TTL: Duration = Duration::from_secs(1);

/// The last status taken, shared by the connections.
type Cached = Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, proto::admin::Status)>>>;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Health,
    Ready,
}

/// Why a request is answered with an error status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: not an HTTP/1.x request line.
    Malformed,
    /// 405: a method other than GET or HEAD.
    Method,
    /// 404
    NotFound,
}

/// The route of a request head (everything up to the blank line), and whether the body is to be
/// left out (HEAD). Headers are not needed and not read.
pub fn route(head: &[u8]) -> Result<(Route, bool), Refusal> {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or(Refusal::Malformed)?;
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| Refusal::Malformed)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Malformed);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Refusal::Malformed);
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(Refusal::Method),
    };
    let path = target.split('?').next().unwrap_or_default();
    let route = match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Health,
        "/readyz" => Route::Ready,
        _ => return Err(Refusal::NotFound),
    };
    Ok((route, head_only))
}

pub async fn serve(listener: TcpListener, admin: Admin, version: &'static str) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let cached: Cached = Arc::default();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the limit, a connection is told so and closed at once rather than queued (a
        // non-blocking write of a few bytes into a fresh socket's buffer).
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let _ = stream.try_write(BUSY);
            continue;
        };
        let (admin, cached) = (admin.clone(), cached.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(READ_TIMEOUT * 2, answer(stream, admin, cached, version))
                .await;
        });
    }
}

const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n";

/// The node's status, taken again only when the cached one is older than [`STATUS_TTL`].
async fn status(admin: &Admin, cached: &Cached) -> Option<proto::admin::Status> {
    let mut c = cached.lock().await;
    if let Some((at, s)) = c.as_ref() {
        if at.elapsed() < STATUS_TTL {
            return Some(s.clone());
        }
    }
    let s = admin.status().await.ok()?;
    *c = Some((tokio::time::Instant::now(), s.clone()));
    Some(s)
}

async fn answer(
    mut stream: TcpStream,
    admin: Admin,
    cached: Cached,
    version: &str,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() >= MAX_HEAD_BYTES {
                return Err(Refusal::Malformed);
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Err(Refusal::Malformed),
                Ok(n) => head.extend_from_slice(&buf[..n.min(MAX_HEAD_BYTES + 4 - head.len())]),
            }
        }
        Ok(())
    };
    let routed = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(())) => route(&head),
        Ok(Err(e)) => Err(e),
        Err(_) => return Ok(()),
    };
    let (code, content_type, body, head_only) = match routed {
        Err(Refusal::Malformed) => (400, "text/plain", "bad request\n".to_string(), false),
        Err(Refusal::Method) => (405, "text/plain", "only GET and HEAD\n".to_string(), false),
        Err(Refusal::NotFound) => (
            404,
            "text/plain",
            "not found: /metrics, /healthz, /readyz\n".to_string(),
            false,
        ),
        // Alive while the mesh task (mesh mode) takes commands.
        Ok((Route::Health, h)) if admin.alive() => (200, "text/plain", "ok\n".to_string(), h),
        Ok((Route::Health, h)) => (
            503,
            "text/plain",
            "the mesh task has stopped\n".to_string(),
            h,
        ),
        Ok((route, h)) => match status(&admin, &cached).await {
            None => (
                503,
                "text/plain",
                "the mesh task has stopped\n".to_string(),
                h,
            ),
            Some(status) => {
                let ready = metrics::readiness(&status, crate::mesh::run::now_ms() / 1000);
                match route {
                    Route::Metrics => (
                        200,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics::render(&status, &ready, version),
                        h,
                    ),
                    _ => (
                        if ready.is_ready() { 200 } else { 503 },
                        "text/plain",
                        ready.text(),
                        h,
                    ),
                }
            }
        },
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_the_three_paths() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok((Route::Metrics, false))
        );
        assert_eq!(
            route(b"HEAD /readyz HTTP/1.0\r\n\r\n"),
            Ok((Route::Ready, true))
        );
        assert_eq!(
            route(b"GET /healthz?verbose=1 HTTP/1.1\r\n\r\n"),
            Ok((Route::Health, false))
        );
    }

    #[test]
    fn refuses_what_is_not_a_get_of_a_known_path() {
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Err(Refusal::Method)
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Err(Refusal::NotFound));
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Err(Refusal::Malformed));
        assert_eq!(
            route(b"GET /metrics SPDY/3\r\n\r\n"),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            route(b"GET  /metrics HTTP/1.1\r\n\r\n"),
            Err(Refusal::Malformed)
        );
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Err(Refusal::Malformed));
        assert_eq!(route(b"GET /metrics HTTP/1.1"), Err(Refusal::Malformed));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(head in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = route(&head);
        }
    }
}
