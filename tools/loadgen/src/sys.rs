//! Thin libc wrappers: bind-before-connect sockets, RLIMIT_NOFILE, CPU affinity, thread CPU time,
//! and reading another process's CPU time and RSS from /proc.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::FromRawFd;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = a.port().to_be();
    sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    sa
}

fn set_int_opt(
    fd: libc::c_int,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: fd is a socket we own; the option value is a c_int on the stack.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// Starts a non-blocking TCP connect to `dst`, optionally from source address `src` (bound with
/// IP_BIND_ADDRESS_NO_PORT so the kernel picks the port at connect time, per 4-tuple, which is
/// what lets tens of thousands of connections share a few source addresses).
/// Completion shows up as writability; check `take_error()` then.
pub fn connect_nonblocking(
    dst: SocketAddrV4,
    src: Option<Ipv4Addr>,
) -> io::Result<mio::net::TcpStream> {
    // SAFETY: plain socket(2) call; the fd is owned by the TcpStream below or closed on error.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: fd was just created and is owned by nobody else; from here on `stream` closes it.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    if let Some(ip) = src {
        set_int_opt(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        let sa = sockaddr(SocketAddrV4::new(ip, 0));
        // SAFETY: sa is a valid sockaddr_in of the given length.
        cvt(unsafe {
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        })
        .map_err(|e| io::Error::new(e.kind(), format!("bind {ip}: {e}")))?;
    }
    let sa = sockaddr(dst);
    // SAFETY: as above.
    let r = unsafe {
        libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(mio::net::TcpStream::from_std(stream))
}

/// `poll.poll` that treats EINTR as "no events" and turns other errors into a message.
pub fn poll_wait(
    poll: &mut mio::Poll,
    events: &mut mio::Events,
    timeout: std::time::Duration,
) -> Result<(), String> {
    match poll.poll(events, Some(timeout)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            events.clear();
            Ok(())
        }
        Err(e) => Err(format!("epoll wait: {e}")),
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> io::Result<u64> {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a stack struct.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        cvt(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl))?;
        if rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            cvt(libc::setrlimit(libc::RLIMIT_NOFILE, &rl))?;
        }
        Ok(rl.rlim_cur as u64)
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) targets the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        cvt(libc::sched_setaffinity(
            0,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        ))
        .map(|_| ())
    }
}

/// (user, system) CPU time of the calling thread, in microseconds.
pub fn thread_cpu_us() -> (u64, u64) {
    // SAFETY: getrusage fills the struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut ru) != 0 {
            return (0, 0);
        }
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        (us(ru.ru_utime), us(ru.ru_stime))
    }
}

/// CPU time (user + system) of this whole process so far, in microseconds.
pub fn process_cpu_us() -> u64 {
    // SAFETY: getrusage fills the struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) != 0 {
            return 0;
        }
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        us(ru.ru_utime) + us(ru.ru_stime)
    }
}

/// Precise CPU time (user + system) of the calling thread in microseconds, from
/// /proc/thread-self/schedstat (nanoseconds of run time); 0 if unavailable.
pub fn thread_cpu_total_us() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |ns| ns / 1000)
}

/// A process's CPU time (utime, stime from /proc/PID/stat fields 14 and 15) and VmRSS.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub utime_us: u64,
    pub stime_us: u64,
    pub rss_bytes: u64,
}

pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Parses the text of /proc/PID/stat; returns (utime, stime) in clock ticks.
pub fn parse_stat(text: &str) -> Option<(u64, u64)> {
    // The command name (field 2) may contain spaces and ')' : split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field n is f[n - 3].
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn sample_process(pid: u32) -> Result<ProcSample, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("reading /proc/{pid}/stat: {e}"))?;
    let (ut, st) = parse_stat(&stat).ok_or_else(|| format!("cannot parse /proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    let tick_us = 1_000_000 / clock_ticks();
    Ok(ProcSample {
        utime_us: ut * tick_us,
        stime_us: st * tick_us,
        rss_bytes: parse_vmrss(&status).unwrap_or(0),
    })
}

/// A non-blocking timerfd (CLOCK_MONOTONIC): lets a thread wait for a deadline finer than
/// epoll's milliseconds inside the same `epoll_wait` that reads its sockets, instead of
/// sleeping while their data waits.
pub struct TimerFd {
    fd: std::os::fd::OwnedFd,
}

impl TimerFd {
    pub fn new() -> io::Result<TimerFd> {
        // SAFETY: plain syscall; the returned descriptor is owned below.
        let fd = cvt(unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        })?;
        // SAFETY: fd was just created and is owned by nobody else.
        Ok(TimerFd {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fires once, `after` from now (at least 1 ns: zero would disarm it).
    pub fn set(&self, after: std::time::Duration) -> io::Result<()> {
        let after = after.max(std::time::Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        use std::os::fd::AsRawFd;
        // SAFETY: fd is a timerfd we own; spec lives on the stack for the call.
        cvt(unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) })
            .map(drop)
    }

    /// Consumes an expiry so the next one raises a new edge.
    pub fn clear(&self) {
        use std::os::fd::AsRawFd;
        let mut n = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a stack buffer from a timerfd we own.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), n.as_mut_ptr().cast(), 8) };
    }

    pub fn raw(&self) -> libc::c_int {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing() {
        let s = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 111 222 0 0 20 0 1 0 5 6 7";
        assert_eq!(parse_stat(s), Some((111, 222)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(
            parse_vmrss("Name:\tx\nVmRSS:\t  2048 kB\n"),
            Some(2048 * 1024)
        );
    }

    #[test]
    fn own_process_sample() {
        let s = sample_process(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
        let _ = thread_cpu_us();
    }

    #[test]
    fn connect_from_second_loopback_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = match l.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let _s = connect_nonblocking(dst, Some(Ipv4Addr::new(127, 0, 0, 7))).unwrap();
        let (_c, peer) = l.accept().unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7)));
    }
}
