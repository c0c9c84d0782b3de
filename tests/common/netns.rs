//! Separate hosts for tests, made of Linux network namespaces (issue 12, point 4):
//! each host is a namespace with its own loopback and one `eth0`, a veth link to a
//! bridge in a switch namespace of its own, with an address in 10.77.0.0/24. Names
//! are unique per test run (process id and a counter) and everything is removed
//! when the [`Net`] is dropped, also when the test panics. Nothing is added to the
//! test's own namespace, so traffic between the hosts stays among them.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and `ip` (iproute2): where a
//! namespace cannot be made, [`Net::new`] prints why and returns `None`, and the
//! test returns early.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// One host: a namespace with `eth0` at `addr`.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
}

impl Host {
    /// `program` run inside this host's namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, program]);
        cmd
    }

    /// Runs `f` on a thread of its own moved into this host's namespace: the
    /// sockets it makes belong to the host (and stay so wherever they are used
    /// afterwards), so one test process can be many clients of one host.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{}", self.netns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on an open namespace fd; it changes only this thread.
            let rc = unsafe { nix::libc::setns(ns.as_raw_fd(), nix::libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

/// The hosts of one test and the switch between them.
pub struct Net {
    switch: String,
    pub hosts: Vec<Host>,
}

fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// Hosts named `names`, at 10.77.0.1, .2, ... in that order. `None` (and a
    /// message saying why) where namespaces cannot be made here.
    pub fn new(names: &[&str]) -> Option<Net> {
        static RUN: AtomicU32 = AtomicU32::new(0);
        // Interface names have 15 bytes at most: keep the tag short.
        let tag = format!(
            "{:x}{}",
            std::process::id() % 0x10000,
            RUN.fetch_add(1, Ordering::SeqCst)
        );
        let mut net = Net {
            switch: format!("rsmfd-{tag}-switch"),
            hosts: Vec::new(),
        };
        if let Err(e) = ip(&["netns", "add", &net.switch]) {
            eprintln!("SKIPPED: cannot create network namespaces here ({e})");
            return None;
        }
        match net.build(&tag, names) {
            Ok(()) => Some(net),
            Err(e) => panic!("setting up the namespaces: {e}"),
        }
    }

    fn build(&mut self, tag: &str, names: &[&str]) -> Result<(), String> {
        let sw = self.switch.clone();
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (i, name) in names.iter().enumerate() {
            let netns = format!("rsmfd-{tag}-{name}");
            ip(&["netns", "add", &netns])?;
            let addr = Ipv4Addr::new(10, 77, 0, i as u8 + 1);
            self.hosts.push(Host {
                name: name.to_string(),
                netns: netns.clone(),
                addr,
            });
            // Made in the switch namespace, then one end moved to the host.
            let (host_end, switch_end) = (format!("h{tag}x{i}"), format!("s{tag}x{i}"));
            ip(&[
                "-n",
                &sw,
                "link",
                "add",
                &host_end,
                "type",
                "veth",
                "peer",
                "name",
                &switch_end,
            ])?;
            ip(&["-n", &sw, "link", "set", &switch_end, "master", "br0", "up"])?;
            ip(&["-n", &sw, "link", "set", &host_end, "netns", &netns])?;
            ip(&["-n", &netns, "link", "set", &host_end, "name", "eth0"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// The host's IPv4 routing table (`ip route`), one route a line.
    pub fn routes(&self, host: &Host) -> String {
        let out = ip(&["-n", &host.netns, "-4", "route"]).expect("ip route");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Fails the test unless traffic stays among the hosts: none has a route out
    /// of 10.77.0.0/24.
    pub fn assert_no_route_out(&self) {
        for host in &self.hosts {
            let routes = self.routes(host);
            assert!(
                routes.lines().all(|r| r.starts_with("10.77.0.0/24 ")),
                "{}: {routes}",
                host.name
            );
        }
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth, and so the pair.
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.netns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}
