//! Which addresses may become targets, whoever registers them: the admin API, `--target`,
//! `--target-dns` (and so the workers `--autoscale` starts, which register through the
//! admin API).
//!
//! - **Never the balancer itself.** A target at the balancer's own listen address loops
//!   every request back into the balancer until it hangs; its admin address answers no
//!   protocol at all. An address counts as the balancer's when its port is one of the
//!   balancer's and it reaches that listener: the same address, or, for a listener on
//!   `0.0.0.0`/`::`, any loopback address or any address of the host's interfaces (read
//!   when the check runs, so an address added later counts too).
//! - **Never an address nothing can connect to**: `0.0.0.0`, `::`, multicast, broadcast,
//!   port 0.
//! - **Only inside `--register-allow`**, when given: the networks (CIDRs) workers live in.
//!   The rule is about the registered address, not the caller's: a worker may register
//!   from behind NAT, and the caller is already authenticated by the admin token; what
//!   must not happen is that a token holder points the pool at some other machine.
//! - **At most `--max-targets`** registered at once (the target group checks the count,
//!   under its registration lock, so two concurrent registrations cannot both pass).
//!
//! Refusals are counted by reason in `tidepool_target_registrations_refused_total`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;

/// Why an address may not be registered as a target.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetRefusal {
    /// An address nothing can connect to (unspecified, multicast, broadcast, port 0).
    Unroutable,
    /// The balancer's own listener (`listen` or `admin`).
    Own {
        /// Which listener.
        listener: &'static str,
        /// Its bound address.
        addr: SocketAddr,
    },
    /// Outside every `--register-allow` network.
    NotAllowed {
        /// The allowed networks, as configured.
        allowed: Vec<IpNet>,
    },
    /// `--max-targets` are registered already.
    Full {
        /// The cap.
        max: usize,
    },
}

impl TargetRefusal {
    /// The `reason` label of the refusal counter.
    pub fn reason(&self) -> &'static str {
        match self {
            TargetRefusal::Unroutable => "unroutable",
            TargetRefusal::Own { .. } => "own_address",
            TargetRefusal::NotAllowed { .. } => "not_allowed",
            TargetRefusal::Full { .. } => "full",
        }
    }

    const REASONS: [&'static str; 4] = ["unroutable", "own_address", "not_allowed", "full"];
}

impl fmt::Display for TargetRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetRefusal::Unroutable => f.write_str(
                "nothing can connect to it (an unspecified, multicast or broadcast address, or port 0); register the address the worker is reachable at",
            ),
            TargetRefusal::Own { listener, addr } => write!(
                f,
                "it is this balancer's own {listener} address ({addr}): requests would loop back into the balancer"
            ),
            TargetRefusal::NotAllowed { allowed } => {
                let nets: Vec<String> = allowed.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "it is outside the networks targets may be in (--register-allow {})",
                    nets.join(",")
                )
            }
            TargetRefusal::Full { max } => write!(
                f,
                "{max} targets are registered already (--max-targets); deregister one or raise the cap"
            ),
        }
    }
}

/// The rules every registration passes; the target group holds one.
#[derive(Debug)]
pub(crate) struct TargetRules {
    /// The balancer's own listeners, by name, with their bound (real) addresses.
    own: Vec<(&'static str, SocketAddr)>,
    /// Networks targets may be in; any when empty.
    allow: Vec<IpNet>,
    /// Most targets registered at once.
    max: usize,
    /// Refusals by reason, in the order of [`TargetRefusal::REASONS`].
    refused: [AtomicU64; 4],
}

impl TargetRules {
    /// Rules that refuse `own` listeners, addresses outside `allow` (when not empty) and
    /// more than `max` targets.
    pub(crate) fn new(
        own: Vec<(&'static str, SocketAddr)>,
        allow: Vec<IpNet>,
        max: usize,
    ) -> TargetRules {
        TargetRules {
            own,
            allow,
            max,
            refused: Default::default(),
        }
    }

    /// The most targets registered at once.
    pub(crate) fn max_targets(&self) -> usize {
        self.max
    }

    /// Checks `addr` against the address rules (not the count).
    pub(crate) fn check(&self, addr: SocketAddr) -> Result<(), TargetRefusal> {
        let ip = addr.ip().to_canonical();
        let unroutable = match ip {
            IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
            IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
        };
        if unroutable || addr.port() == 0 {
            return Err(TargetRefusal::Unroutable);
        }
        let mut host = None;
        for &(listener, own) in &self.own {
            if own.port() != addr.port() {
                continue;
            }
            let own_ip = own.ip().to_canonical();
            let reaches = ip == own_ip
                || (own_ip.is_unspecified()
                    && (ip.is_loopback() || host.get_or_insert_with(host_addresses).contains(&ip)));
            if reaches {
                return Err(TargetRefusal::Own {
                    listener,
                    addr: own,
                });
            }
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|net| net.contains(&ip)) {
            return Err(TargetRefusal::NotAllowed {
                allowed: self.allow.clone(),
            });
        }
        Ok(())
    }

    /// Counts a refusal.
    pub(crate) fn refused(&self, refusal: &TargetRefusal) {
        let i = TargetRefusal::REASONS
            .iter()
            .position(|r| *r == refusal.reason())
            .unwrap_or_default();
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text of the refusals.
    pub(crate) fn prometheus(&self) -> String {
        let mut out = String::from(
            "# HELP tidepool_target_registrations_refused_total Registrations refused by the target rules, by reason.\n\
             # TYPE tidepool_target_registrations_refused_total counter\n",
        );
        for (reason, count) in TargetRefusal::REASONS.iter().zip(&self.refused) {
            out += &format!(
                "tidepool_target_registrations_refused_total{{reason=\"{reason}\"}} {}\n",
                count.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// The addresses of this host's interfaces (none, with a warning, when they cannot be read:
/// loopback and exact matches are still refused).
fn host_addresses() -> Vec<IpAddr> {
    match nix::ifaddrs::getifaddrs() {
        Ok(interfaces) => interfaces
            .filter_map(|i| i.address)
            .filter_map(|a| {
                a.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
            .collect(),
        Err(error) => {
            tracing::warn!(%error, "could not list the host's addresses; only loopback and exact matches count as the balancer's own");
            Vec::new()
        }
    }
}

/// Parses a `--register-allow` network: a CIDR (`10.0.0.0/8`, `fd00::/8`) or one address.
pub(crate) fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| format!("{s:?} is not a network like 10.0.0.0/8, fd00::/8 or 10.1.2.3"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn rules(listen: &str, admin: &str, allow: &[&str]) -> TargetRules {
        TargetRules::new(
            vec![("listen", sa(listen)), ("admin", sa(admin))],
            allow.iter().map(|n| parse_net(n).unwrap()).collect(),
            8,
        )
    }

    #[test]
    fn the_balancers_own_listeners_are_refused() {
        let r = rules("127.0.0.1:7000", "127.0.0.1:7001", &[]);
        let own = |addr| matches!(r.check(sa(addr)), Err(TargetRefusal::Own { .. }));
        assert!(own("127.0.0.1:7000"));
        assert!(own("127.0.0.1:7001"));
        assert!(
            own("[::ffff:127.0.0.1]:7000"),
            "an IPv4-mapped address is the same"
        );
        // Another loopback address, or another port, is another socket.
        assert_eq!(r.check(sa("127.0.0.2:7000")), Ok(()));
        assert_eq!(r.check(sa("127.0.0.1:7100")), Ok(()));

        // A wildcard listener is reached through every loopback and host address.
        let r = rules("0.0.0.0:7000", "[::]:7001", &[]);
        for addr in [
            "127.0.0.1:7000",
            "127.9.9.9:7000",
            "[::1]:7000",
            "[::1]:7001",
        ] {
            assert_eq!(
                r.check(sa(addr)).map_err(|e| e.reason()),
                Err("own_address"),
                "{addr}"
            );
        }
        for ip in host_addresses() {
            let addr = SocketAddr::new(ip, 7000);
            assert!(
                matches!(
                    r.check(addr),
                    Err(TargetRefusal::Own {
                        listener: "listen",
                        ..
                    })
                ),
                "{addr}"
            );
        }
        // A documentation address is not this host's.
        assert_eq!(r.check(sa("192.0.2.10:7000")), Ok(()));
        let err = rules("0.0.0.0:7000", "127.0.0.1:7001", &[])
            .check(sa("127.0.0.1:7000"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("own listen address") && err.contains("loop"),
            "{err}"
        );
    }

    #[test]
    fn unroutable_addresses_are_refused() {
        let r = rules("127.0.0.1:7000", "127.0.0.1:7001", &[]);
        for addr in [
            "0.0.0.0:7100",
            "[::]:7100",
            "224.0.0.1:7100",
            "255.255.255.255:7100",
            "10.0.0.1:0",
        ] {
            assert_eq!(r.check(sa(addr)), Err(TargetRefusal::Unroutable), "{addr}");
        }
    }

    #[test]
    fn register_allow_restricts_the_address() {
        let r = rules(
            "127.0.0.1:7000",
            "127.0.0.1:7001",
            &["10.0.0.0/8", "fd00::/8", "192.0.2.7"],
        );
        assert_eq!(r.check(sa("10.1.2.3:7100")), Ok(()));
        assert_eq!(r.check(sa("[fd00::5]:7100")), Ok(()));
        assert_eq!(r.check(sa("192.0.2.7:7100")), Ok(()));
        let refused = r.check(sa("192.0.2.8:7100")).unwrap_err();
        assert_eq!(refused.reason(), "not_allowed");
        let text = refused.to_string();
        assert!(text.contains("10.0.0.0/8,fd00::/8,192.0.2.7/32"), "{text}");
        // The own-address rule comes first: its message is the more useful one.
        let r = rules("127.0.0.1:7000", "127.0.0.1:7001", &["10.0.0.0/8"]);
        assert_eq!(
            r.check(sa("127.0.0.1:7000")).unwrap_err().reason(),
            "own_address"
        );
    }

    #[test]
    fn networks_parse_and_refusals_are_counted() {
        assert_eq!(parse_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_net(" 10.1.2.3 ").unwrap().to_string(), "10.1.2.3/32");
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("workers").unwrap_err().contains("10.0.0.0/8"));

        let r = rules("127.0.0.1:7000", "127.0.0.1:7001", &[]);
        r.refused(&TargetRefusal::Full { max: 8 });
        r.refused(&TargetRefusal::Full { max: 8 });
        r.refused(&TargetRefusal::Unroutable);
        let text = r.prometheus();
        assert!(text.contains("tidepool_target_registrations_refused_total{reason=\"full\"} 2\n"));
        assert!(text.contains("{reason=\"unroutable\"} 1\n"));
        assert!(text.contains("{reason=\"own_address\"} 0\n"));
        assert_eq!(r.max_targets(), 8);
    }
}
