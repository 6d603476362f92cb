//! Counts the heap allocations of the data-path threads, so that "no allocation per packet" is a
//! number anyone can read (`meshctl status -o json`, `datapath`), not a claim. A thread says once
//! which path it runs ([`mark`]); every allocation it makes afterwards adds one to that path's
//! counter. Other threads pay one thread-local read per allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The data-path threads.
#[derive(Clone, Copy)]
pub enum Path {
    /// `tun-rx`: read, split, check, encrypt, send.
    Send = 1,
    /// `udp-rx`: receive, decrypt, check, coalesce, write.
    Receive = 2,
}

static COUNTS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

thread_local! {
    static PATH: Cell<usize> = const { Cell::new(0) };
}

/// From now on, this thread's allocations count against `path`.
pub fn mark(path: Path) {
    PATH.with(|p| p.set(path as usize));
}

/// Allocations made so far by the threads of `path`.
pub fn count(path: Path) -> u64 {
    COUNTS[path as usize].load(Relaxed)
}

pub struct Counting;

// SAFETY: every call is passed on to the system allocator unchanged; the counting touches only a
// const-initialised thread-local (no allocation, no destructor) and an atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        tally();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        tally();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        tally();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[inline]
fn tally() {
    // try_with: the thread-local may already be gone while a thread exits.
    if let Ok(p) = PATH.try_with(Cell::get) {
        if p != 0 {
            COUNTS[p].fetch_add(1, Relaxed);
        }
    }
}
