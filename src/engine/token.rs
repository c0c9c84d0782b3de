// SPDX-License-Identifier: MPL-2.0

//! The numbers given to epoll with each fd: the one place that chooses them, so the
//! IO thread can tell a client from the waker and from the service's fds.

use super::client::ClientId;

/// The waker eventfd.
const WAKER: u64 = u64::MAX;
/// Set on every fd of the service; client ids, counted up from 1, never reach it.
const SERVICE: u64 = 1 << 62;
/// Set, with `SERVICE`, on the service's connections (not on its listening sockets).
const CONNECTION: u64 = 1 << 61;

/// What an epoll event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    /// The worker's waker: something changed that the IO thread must look at.
    Waker,
    /// A client of the worker.
    Client(ClientId),
    /// One of the service's fds.
    Service(ServiceToken),
}

/// How the service names its fds (as mio's `Token`): it chooses the numbers, the
/// engine hands them back with each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceToken {
    /// A listening socket, by its index.
    Listener(usize),
    /// A connection not yet handed over as a client.
    Connection(u64),
}

impl Token {
    pub(crate) fn to_epoll(self) -> u64 {
        match self {
            Token::Waker => WAKER,
            Token::Client(id) => id,
            Token::Service(ServiceToken::Listener(i)) => SERVICE | i as u64,
            Token::Service(ServiceToken::Connection(n)) => SERVICE | CONNECTION | n,
        }
    }

    pub(crate) fn from_epoll(data: u64) -> Token {
        if data == WAKER {
            Token::Waker
        } else if data & SERVICE == 0 {
            Token::Client(data)
        } else if data & CONNECTION == 0 {
            Token::Service(ServiceToken::Listener((data & !SERVICE) as usize))
        } else {
            Token::Service(ServiceToken::Connection(data & !(SERVICE | CONNECTION)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_comes_back_from_epoll() {
        for token in [
            Token::Waker,
            Token::Client(1),
            Token::Client(1 << 40),
            Token::Service(ServiceToken::Listener(0)),
            Token::Service(ServiceToken::Listener(17)),
            Token::Service(ServiceToken::Connection(16)),
            Token::Service(ServiceToken::Connection(1 << 40)),
        ] {
            assert_eq!(Token::from_epoll(token.to_epoll()), token);
        }
    }
}
