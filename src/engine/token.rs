// SPDX-License-Identifier: MPL-2.0

//! The numbers given to epoll with each fd: the one place that chooses them, so the
//! IO thread can tell a client from the waker.

use super::client::ClientId;

/// The waker eventfd. Client ids are counted up from 1 and never reach it.
const WAKER: u64 = u64::MAX;

/// What an epoll event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    /// The worker's waker: something changed that the IO thread must look at.
    Waker,
    /// A client of the worker.
    Client(ClientId),
}

impl Token {
    pub(crate) fn to_epoll(self) -> u64 {
        match self {
            Token::Waker => WAKER,
            Token::Client(id) => id,
        }
    }

    pub(crate) fn from_epoll(data: u64) -> Token {
        if data == WAKER {
            Token::Waker
        } else {
            Token::Client(data)
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
            Token::Client(u64::MAX - 1),
        ] {
            assert_eq!(Token::from_epoll(token.to_epoll()), token);
        }
    }
}
