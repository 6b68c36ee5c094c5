//! Process hardening for a memory-only chat server: no core dumps, optional memory locking.
//!
//! Chat text and usernames live only in this process's memory. These calls keep them there:
//! the process marks itself non-dumpable (no core file, no ptrace attach by other users of the
//! same uid, `/proc/PID/mem` closed to them) and sets its core-file limit to zero, and with
//! `--lock-memory` locks its pages so chat never reaches swap; and freed memory goes back to
//! the operating system after a storm. They are the only `unsafe` code in chatloop (the
//! library forbids it): a few libc calls with plain integer arguments.

use std::io;

/// Marks the process non-dumpable and sets `RLIMIT_CORE` to zero.
pub fn forbid_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `setrlimit` reads one valid `rlimit` struct; `prctl(PR_SET_DUMPABLE, 0)` takes
    // only integers. Neither touches memory the Rust program owns.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Locks every current and future page in memory (`mlockall`), faulting pages in only when
/// first touched (`MCL_ONFAULT`, Linux 4.4+), so locking does not inflate RSS up front.
/// Needs `CAP_IPC_LOCK` or an `RLIMIT_MEMLOCK` (systemd: `LimitMEMLOCK=`) above the peak RSS.
pub fn lock_memory() -> io::Result<()> {
    // SAFETY: `mlockall` takes only flags.
    let mut rc =
        unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // A kernel older than 4.4 does not know MCL_ONFAULT.
        // SAFETY: as above.
        rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    }
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Hands freed heap memory back to the operating system (glibc's `malloc_trim(0)`, which also
/// releases free pages in the middle of the heap). After a storm ends, glibc would otherwise
/// keep its peak. The loop calls this rarely (`Server::set_release_memory`); a no-op elsewhere
/// (musl's allocator returns memory by itself).
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `malloc_trim` takes an integer and only touches the allocator's own state.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether the process is currently dumpable (for the start-up log and tests).
pub fn dumpable() -> bool {
    // SAFETY: `prctl(PR_GET_DUMPABLE)` takes only integers and returns the flag.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) > 0 }
}
