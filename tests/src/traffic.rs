//! Traffic for the policy tests: a TCP echo server in a namespace, and a client that says whether
//! a connection carried a round trip.

use crate::in_netns;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A TCP echo server in `ns` on `addr`, until dropped.
pub struct Echo {
    stop: Arc<AtomicBool>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub fn echo(ns: &str, addr: SocketAddr) -> Echo {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    in_netns(ns, move || {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        l.set_nonblocking(true).unwrap();
        let _ = ready_tx.send(());
        while !flag.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        s.set_nonblocking(false).ok();
                        s.set_read_timeout(Some(Duration::from_millis(200))).ok();
                        let mut buf = [0u8; 1024];
                        while !flag.load(Ordering::Relaxed) {
                            match s.read(&mut buf) {
                                Ok(0) => return,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                            | std::io::ErrorKind::Interrupted
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("echo server started");
    Echo { stop }
}

/// Whether a TCP connection from `ns` to `addr` opens and carries a round trip (so the replies
/// of the flow pass too) within `timeout`.
pub fn talks(ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
    in_netns(ns, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
            return false;
        };
        s.set_read_timeout(Some(timeout)).ok();
        if s.write_all(b"ping").is_err() {
            return false;
        }
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).is_ok() && &buf == b"ping"
    })
    .join()
    .unwrap_or(false)
}

/// How long a connection that policy allows may take to open here.
pub const QUICK: Duration = Duration::from_secs(2);
