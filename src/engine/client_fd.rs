// SPDX-License-Identifier: MPL-2.0

//! The system calls on a client's fd: classify it, make it non-blocking, watch it
//! with epoll, set its DSCP, write an iovec (or a range of the spool) to it and read
//! and drop its input.

use std::io::IoSlice;
use std::os::fd::{BorrowedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use nix::sys::sendfile::sendfile64;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt,
    sendmsg, setsockopt, sockopt,
};
use nix::sys::stat::{SFlag, fstat};

use super::client::{Client, ClientId, FdKind, Watch};
use super::spool::FdClass;
use super::token::Token;
use super::types::ClientStatus;

/// Classifies the fd, makes it non-blocking and watches it. Errors make the client
/// broken, to be removed by the IO thread.
pub(super) fn open_client_fd(
    fd: RawFd,
    id: ClientId,
    handle_read: bool,
    epoll: &Epoll,
) -> (FdKind, Watch) {
    if fd < 0 {
        return (FdKind::Stream, Watch::Broken(Errno::EBADF));
    }
    // SAFETY: the fd is only borrowed for these calls; the number may be closed, in
    // which case the calls fail with EBADF.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    let st = match fstat(bfd) {
        Ok(st) => st,
        Err(e) => return (FdKind::Stream, Watch::Broken(e)),
    };
    let file_type = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if file_type == SFlag::S_IFDIR {
        return (FdKind::Stream, Watch::Broken(Errno::EISDIR));
    }
    let kind = if file_type == SFlag::S_IFSOCK {
        FdKind::Socket
    } else {
        FdKind::Stream
    };
    let flags = match fcntl(bfd, FcntlArg::F_GETFL) {
        Ok(f) => OFlag::from_bits_truncate(f),
        Err(e) => return (kind, Watch::Broken(e)),
    };
    if (flags & OFlag::O_ACCMODE) == OFlag::O_RDONLY {
        return (kind, Watch::Broken(Errno::EBADF));
    }
    if let Err(e) = fcntl(bfd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)) {
        return (kind, Watch::Broken(e));
    }
    // EPOLLOUT is only watched while the client is blocked (see `watch_writable`):
    // a caught-up client would otherwise wake the IO thread every time its peer
    // reads.
    let token = Token::Client(id).to_epoll();
    match epoll.add(bfd, EpollEvent::new(base_events(handle_read), token)) {
        Ok(()) => (kind, Watch::Epoll),
        // Regular files and block devices cannot be polled: always writable.
        Err(Errno::EPERM) => (kind, Watch::AlwaysWritable),
        Err(e) => (kind, Watch::Broken(e)),
    }
}

/// What a client's fd is always watched for.
pub(super) fn base_events(handle_read: bool) -> EpollFlags {
    if handle_read {
        EpollFlags::EPOLLIN | EpollFlags::EPOLLET
    } else {
        EpollFlags::EPOLLET
    }
}

/// Watches a blocked client's fd for space (edge-triggered), or stops watching once
/// it is writable again. Re-arming also reports space that appeared meanwhile.
pub(super) fn watch_writable(epoll: &Epoll, c: &Client, on: bool) {
    if c.watch != Watch::Epoll {
        return;
    }
    let mut events = base_events(c.handle_read);
    if on {
        events |= EpollFlags::EPOLLOUT;
    }
    // SAFETY: the app keeps the fd open until client-fd-removed.
    let bfd = unsafe { BorrowedFd::borrow_raw(c.fd) };
    let token = Token::Client(c.id).to_epoll();
    let _ = epoll.modify(bfd, &mut EpollEvent::new(events, token));
}

pub(super) fn apply_dscp(fd: RawFd, dscp: Option<u8>) {
    let Some(dscp) = dscp else { return };
    let tos = i32::from(dscp) << 2;
    // SAFETY: borrowed for one call; a stale number only makes the call fail.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    if setsockopt(&bfd, sockopt::Ipv4Tos, &tos).is_err() {
        let _ = setsockopt(&bfd, sockopt::Ipv6TClass, &tos);
    }
}

pub(super) fn write_iov(fd: RawFd, kind: FdKind, iov: &[IoSlice<'_>]) -> nix::Result<usize> {
    // SAFETY: the client's fd stays open until client-fd-removed, and writes happen
    // under the engine lock, which removal takes first.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    match kind {
        FdKind::Socket => match sendmsg::<()>(
            fd,
            iov,
            &[],
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            // A socket that is not connected-mode (or a socket-like fd) may refuse
            // sendmsg; writev still works for those.
            Err(Errno::ENOTSOCK) => nix::sys::uio::writev(bfd, iov),
            r => r,
        },
        FdKind::Stream => nix::sys::uio::writev(bfd, iov),
    }
}

/// What kind of file `fd` is, for `sendfile` (which works on some kinds only).
pub(super) fn fd_class(fd: RawFd) -> FdClass {
    // SAFETY: borrowed for these calls; the app keeps the fd open until
    // client-fd-removed.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    let Ok(st) = fstat(bfd) else {
        return FdClass::Other;
    };
    let file_type = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    match file_type {
        SFlag::S_IFIFO => FdClass::Pipe,
        SFlag::S_IFREG => FdClass::File,
        SFlag::S_IFCHR => FdClass::CharDevice,
        SFlag::S_IFSOCK => {
            let stream = getsockopt(&bfd, sockopt::SockType) == Ok(SockType::Stream);
            let family = getsockname::<SockaddrStorage>(fd)
                .ok()
                .and_then(|a| a.family());
            match family {
                Some(AddressFamily::Unix) => FdClass::UnixSocket,
                Some(AddressFamily::Inet | AddressFamily::Inet6) if stream => FdClass::TcpSocket,
                _ => FdClass::OtherSocket,
            }
        }
        _ => FdClass::Other,
    }
}

/// Writes `len` bytes of `file` from `offset` to the client's fd. Unlike `sendmsg`,
/// `sendfile` has no MSG_NOSIGNAL: a socket or pipe whose reader went away raises
/// SIGPIPE, which every IO thread blocks (`io_loop::run`).
pub(super) fn send_file(
    fd: RawFd,
    file: BorrowedFd<'_>,
    offset: u64,
    len: usize,
) -> nix::Result<usize> {
    // SAFETY: as in `write_iov`.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut off = offset as i64;
    sendfile64(bfd, file, Some(&mut off), len)
}

/// Reads what the client sent, through `scratch`: dropped, or appended to `kept`
/// when given. Some(status) when the client is gone.
pub(super) fn read_input(
    fd: RawFd,
    scratch: &mut [u8],
    mut kept: Option<&mut Vec<u8>>,
) -> Option<ClientStatus> {
    // SAFETY: the app keeps the fd open until client-fd-removed.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    loop {
        match nix::unistd::read(bfd, scratch) {
            Ok(0) => return Some(ClientStatus::Closed),
            Ok(n) => {
                if let Some(kept) = kept.as_deref_mut() {
                    kept.extend_from_slice(&scratch[..n]);
                }
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return None,
            // Write-only fds (a pipe's write end) cannot be read: nothing to discard.
            Err(Errno::EBADF) | Err(Errno::EINVAL) => return None,
            Err(_) => return Some(ClientStatus::Error),
        }
    }
}

/// Which of these fds will not take data now (one `poll` for all, no waiting): a
/// client past a limit is slow only if its own fd is full. Exact for pipes (POLLOUT
/// while any room is left); fds that cannot be polled count as taking data: the IO
/// thread finds out what is wrong with them.
pub(super) fn full_fds(fds: &[RawFd]) -> Vec<bool> {
    // SAFETY: the app keeps client fds open until client-fd-removed.
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|&fd| PollFd::new(unsafe { BorrowedFd::borrow_raw(fd) }, PollFlags::POLLOUT))
        .collect();
    if poll(&mut polled, PollTimeout::ZERO).is_err() {
        return vec![false; fds.len()];
    }
    polled
        .iter()
        .map(|p| {
            p.revents()
                .is_some_and(|r| !r.intersects(PollFlags::POLLOUT | PollFlags::POLLNVAL))
        })
        .collect()
}
