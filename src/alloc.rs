//! The allocator of the `smgate` binary and of the benches that stand in for it.
//!
//! mimalloc instead of glibc malloc. The MQTT writer thread allocates and frees constantly
//! (redb page buffers, JSON, chart steps) while the tokio workers do too: glibc's arena locks
//! then make the writer wait on the other threads, and mimalloc's per-thread heaps do not
//! (figures: docs/performance.md, "The allocator"). It detects the page size at run time (ARM kernels
//! with 16 KiB pages) and builds from one C file for every target.

/// [`mimalloc::MiMalloc`] with one option changed before its first allocation: mimalloc
/// commits arenas eagerly by default and then purges freed memory by resetting it, which
/// Linux does not take out of RSS, so a gateway at rest kept its peak. Arenas committed on
/// demand are purged by decommitting, and RSS falls back once a burst is over (figures:
/// docs/performance.md, "Figures from code comments"). The option has to be set before mimalloc reserves its first arena,
/// which happens before `main`, hence the wrapper. `MIMALLOC_ARENA_EAGER_COMMIT` in the
/// environment still wins (this only sets the default).
///
/// It does take effect, though `MIMALLOC_VERBOSE=1 smgate --version` prints
/// `arena_eager_commit: 2`: verbose output makes mimalloc read every option while the process
/// loads, before this runs; without it, options are read at the first allocation, after. `strace
/// -e mmap smgate --version` shows it: mimalloc reserves its 1 GiB arena `PROT_NONE` with this
/// default and `PROT_READ|PROT_WRITE` without it. `cargo bench --bench ingest` uses it too,
/// so that the writer there allocates as the gateway's does.
pub struct Allocator;

// mimalloc's options: indexes into the `mi_option_e` of the mimalloc 3 that libmimalloc-sys
// 0.1.49 builds (include/mimalloc.h).
const ARENA_EAGER_COMMIT: i32 = 4;
const PURGE_DELAY: i32 = 15;
extern "C" {
    fn mi_option_set_default(option: i32, value: std::ffi::c_long);
    fn mi_option_set(option: i32, value: std::ffi::c_long);
}

static TUNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Allocator {
    #[inline]
    fn tune() {
        use std::sync::atomic::Ordering;
        if !TUNED.load(Ordering::Relaxed) {
            TUNED.store(true, Ordering::Relaxed);
            // SAFETY: sets the default of one option; it neither allocates nor calls back.
            unsafe { mi_option_set_default(ARENA_EAGER_COMMIT, 0) };
        }
    }
}

/// Makes mimalloc return freed memory to the system at once instead of after its default delay
/// (10 ms, and ten times that for whole arenas), unless `MIMALLOC_PURGE_DELAY` in the
/// environment says otherwise. The memory profile `small` asks for it: it lowers the RSS
/// at rest and at the peak of a backlog, at no cost measured there, while with `large`'s
/// batches it cost a quarter of the heartbeats/s (docs/performance.md, "Memory profiles").
/// Harmless when mimalloc is not the allocator (`system-alloc`): it only sets an option.
pub fn purge_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one option; mimalloc reads it when it next schedules a purge.
    unsafe { mi_option_set(PURGE_DELAY, 0) };
}

// SAFETY: every call is forwarded to mimalloc unchanged.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::tune();
        mimalloc::MiMalloc.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::tune();
        mimalloc::MiMalloc.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        mimalloc::MiMalloc.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        mimalloc::MiMalloc.realloc(ptr, layout, new)
    }
}
