//! A listening socket inherited from the process that started the worker. A balancer's
//! `--worker-cmd` actuator binds each worker's port itself and hands the socket over as
//! fd 3, announced the way systemd's socket activation does (`LISTEN_FDS=1`): a port picked,
//! released and bound again by the worker could be taken meanwhile by any local process,
//! which the balancer would then route its clients to.
//!
//! The environment and fd 3 are untrusted input. The socket is used only if it is a TCP
//! socket (listenfd checks its type and family), listening, and bound where `--listen`
//! says; otherwise it is closed and the worker binds `--listen` itself, as it does when
//! nothing was inherited.

use std::net::{SocketAddr, TcpListener};

use nix::sys::socket::{getsockopt, sockopt::AcceptConn};
use tracing::warn;

/// Takes the socket the environment announces, if any, and clears the announcement (so that
/// nothing this process starts inherits the claim). Call it before the process starts a
/// second thread: changing the environment while another thread may read it is a data race.
pub fn take_from_env() -> Option<TcpListener> {
    let listener = match listenfd::ListenFd::from_env().take_tcp_listener(0) {
        Ok(listener) => listener?,
        Err(error) => {
            warn!(%error, "LISTEN_FDS is set but fd 3 is not a TCP socket; binding --listen instead");
            return None;
        }
    };
    match getsockopt(&listener, AcceptConn) {
        Ok(true) => Some(listener),
        Ok(false) => {
            warn!("the socket inherited on fd 3 is not listening; binding --listen instead");
            None
        }
        Err(error) => {
            warn!(%error, "could not check the socket inherited on fd 3; binding --listen instead");
            None
        }
    }
}

/// `inherited` if it is bound where `listen` (the `--listen` value) asks: the same port
/// (any, for port 0) and, where `listen` is an IP address, the same address; a host name is
/// not resolved here, so only its port is compared. Otherwise `None`, with a warning.
pub fn matching(inherited: Option<TcpListener>, listen: &str) -> Option<TcpListener> {
    let listener = inherited?;
    let bound = match listener.local_addr() {
        Ok(bound) => bound,
        Err(error) => {
            warn!(%error, "the socket inherited on fd 3 has no address; binding --listen instead");
            return None;
        }
    };
    if is_where(listen, bound) {
        Some(listener)
    } else {
        warn!(%bound, listen, "the socket inherited on fd 3 is not bound where --listen asks; binding --listen instead");
        None
    }
}

/// Whether a socket bound at `bound` serves `listen`.
fn is_where(listen: &str, bound: SocketAddr) -> bool {
    let port_matches = |port: u16| port == 0 || port == bound.port();
    match listen.parse::<SocketAddr>() {
        Ok(want) => port_matches(want.port()) && want.ip() == bound.ip(),
        Err(_) => listen
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .is_some_and(port_matches),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_socket_bound_where_listen_asks_is_used() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(is_where("127.0.0.1:7100", at("127.0.0.1:7100")));
        assert!(is_where("127.0.0.1:0", at("127.0.0.1:41234")), "any port");
        assert!(
            is_where("localhost:7100", at("127.0.0.1:7100")),
            "a host: port only"
        );
        assert!(is_where("[::1]:7100", at("[::1]:7100")));
        assert!(
            !is_where("127.0.0.1:7100", at("127.0.0.1:7101")),
            "another port"
        );
        assert!(
            !is_where("0.0.0.0:7100", at("127.0.0.1:7100")),
            "--listen asks for every interface"
        );
        assert!(!is_where("localhost:7101", at("127.0.0.1:7100")));
        assert!(!is_where("no port", at("127.0.0.1:7100")));
    }

    #[test]
    fn a_socket_elsewhere_is_dropped_and_one_in_place_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let bound = listener.local_addr().unwrap();
        let other = format!("127.0.0.1:{}", bound.port().wrapping_add(1).max(1));
        assert!(matching(Some(listener), &other).is_none());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let bound = listener.local_addr().unwrap();
        let kept = matching(Some(listener), &bound.to_string()).expect("bound where asked");
        assert_eq!(kept.local_addr().unwrap(), bound);
        assert!(matching(None, &bound.to_string()).is_none());
    }
}
