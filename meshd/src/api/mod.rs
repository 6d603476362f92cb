//! The local API: the WireGuard UAPI socket (for `wg`) and the admin socket (for `meshctl`).
//! Both are Unix sockets that only root can open.

pub mod admin;
pub mod http;
pub mod metrics;
pub mod uapi;

use anyhow::Context;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};
use tokio::net::UnixListener;

/// Binds a root-only Unix socket at `path`, creating its directory. A stale socket file (no one
/// listening) is replaced; a live one means another daemon owns the name, which is an error.
pub fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path.parent().context("socket path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use: is another daemon running for this interface?",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    Ok(listener)
}

static SOCKET_FILES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Remembers a socket file to remove at exit.
pub fn remove_at_exit(path: PathBuf) {
    if let Ok(mut v) = SOCKET_FILES.lock() {
        v.push(path);
    }
}

/// Removes the socket files, so an exit by signal or by a fatal error leaves nothing behind.
pub fn remove_socket_files() {
    if let Ok(v) = SOCKET_FILES.lock() {
        for p in v.iter() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Calls [`remove_socket_files`] when dropped, also on an error return from `main`.
pub struct SocketFiles;

impl Drop for SocketFiles {
    fn drop(&mut self) {
        remove_socket_files();
    }
}

/// Reads one line of at most `max` bytes into `line` (without the newline). `Ok(false)` at end of
/// stream; an over-long line is an error, so a client cannot make us buffer without bound.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut String,
    max: usize,
) -> std::io::Result<bool> {
    line.clear();
    let n = reader.take(max as u64 + 1).read_line(line).await?;
    if n == 0 {
        return Ok(false);
    }
    if !line.ends_with('\n') && n > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "line too long",
        ));
    }
    if line.ends_with('\n') {
        line.pop();
    }
    Ok(true)
}
