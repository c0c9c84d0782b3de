// SPDX-License-Identifier: MPL-2.0

//! Small OS helpers of the three processes: clocks and rusage, watchdogs, the shared
//! counter page and fd passing over the control socket.

use std::io::{IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Most fds in one SCM_RIGHTS message (the kernel's SCM_MAX_FD is 253).
pub const FDS_PER_MSG: usize = 250;

pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain libc call with a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub user: f64,
    pub sys: f64,
    pub nvcsw: i64,
    pub nivcsw: i64,
}

impl Usage {
    /// What was used since `earlier`.
    pub fn since(self, earlier: Usage) -> Usage {
        Usage {
            user: self.user - earlier.user,
            sys: self.sys - earlier.sys,
            nvcsw: self.nvcsw - earlier.nvcsw,
            nivcsw: self.nivcsw - earlier.nivcsw,
        }
    }

    pub fn cpu(self) -> f64 {
        self.user + self.sys
    }
}

fn rusage(who: libc::c_int) -> Usage {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Usage {
        user: tv(ru.ru_utime),
        sys: tv(ru.ru_stime),
        nvcsw: ru.ru_nvcsw,
        nivcsw: ru.ru_nivcsw,
    }
}

/// This process, every thread.
pub fn usage_self() -> Usage {
    rusage(libc::RUSAGE_SELF)
}

/// CPU seconds of the children that ended and were waited for.
pub fn children_cpu() -> f64 {
    rusage(libc::RUSAGE_CHILDREN).cpu()
}

/// Child processes die with their parent (no orphaned drains or sinks).
pub fn die_with_parent() {
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() == 1 {
            std::process::exit(4);
        }
    }
}

/// Ends the process if it is still running after `secs`.
pub fn watchdog(what: &'static str, secs: f64) {
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(secs));
            eprintln!("fanout-bench {what}: watchdog fired after {secs:.0} s, exiting");
            println!("RESULT status=timeout");
            let _ = std::io::stdout().flush();
            std::process::exit(3);
        })
        .expect("watchdog thread");
}

pub fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// Counters the drain publishes and the sink process reads without a syscall: a
/// shared memfd page.
pub struct SharedCounters {
    pub fd: OwnedFd,
    ptr: *const AtomicU64,
}

// SAFETY: the pointer is a shared mapping of atomics that lives as long as the struct.
unsafe impl Send for SharedCounters {}
unsafe impl Sync for SharedCounters {}

/// Slots of the shared page: bytes received (drain), buffers pushed once the producer
/// is done (sink; 0 before), clients whose stream has reached the last of them (drain).
pub const C_BYTES: usize = 0;
pub const C_PUSHED: usize = 1;
pub const C_COMPLETE: usize = 2;

impl SharedCounters {
    pub fn create() -> SharedCounters {
        // SAFETY: memfd_create with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"fanout-bench".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", Errno::last());
        // SAFETY: fd was just created and is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        SharedCounters::map(fd)
    }

    pub fn map(fd: OwnedFd) -> SharedCounters {
        // SAFETY: maps one page of the memfd shared; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap: {}", Errno::last());
        SharedCounters {
            fd,
            ptr: ptr as *const AtomicU64,
        }
    }

    pub fn get(&self, slot: usize) -> &AtomicU64 {
        assert!(slot < 512);
        // SAFETY: within the mapped page; AtomicU64 has the layout of u64.
        unsafe { &*self.ptr.add(slot) }
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        // SAFETY: the mapping made in map().
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, 4096) };
    }
}

pub fn send_fds(sock: RawFd, fds: &[RawFd]) -> nix::Result<()> {
    let iov = [IoSlice::new(b"F")];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::empty(), None).map(|_| ())
}

/// Receives one message's fds; an empty vector at EOF.
pub fn recv_fds(sock: RawFd) -> nix::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 253]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut out = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the kernel just installed these fds for us.
            out.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(out)
}
