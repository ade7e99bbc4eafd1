//! Network namespaces as test hosts: created unique, removed on drop, entered per thread.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::mpsc,
    thread::{self, JoinHandle},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{cmd::run_command, names::unique_name};

/// A network namespace made for one test, deleted (`ip netns del`) when dropped.
///
/// Dropping runs during unwinding too, so a failing test leaves nothing behind. Interfaces
/// that live in the namespace (veth ends, dummies) go away with it. The kernel keeps the
/// namespace itself alive while a socket or thread still uses it, so drop servers first
/// (declare them after the namespace, and they drop before it).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `<prefix>-<pid>-<n>` and brings its loopback up.
    ///
    /// Keep the prefix short (a few letters): names are cut to 15 characters.
    pub fn new(prefix: &str) -> Result<Netns> {
        // A leftover from a crashed run whose pid we happen to reuse could hold the name;
        // take the next counter value rather than touch a namespace we did not create.
        let mut attempt = 0;
        let name = loop {
            let name = unique_name(prefix);
            match run_command("ip", &["netns", "add", &name]) {
                Ok(_) => break name,
                Err(e) if attempt < 16 && format!("{e:#}").contains("File exists") => attempt += 1,
                Err(e) => return Err(e),
            }
        };
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace (`ip netns exec NAME ...`) and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run_command("ip", &full)
    }

    /// Runs `ip -n NAME ...`: cheaper than `exec` for the `ip` tool itself.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_command("ip", &full)
    }

    /// Runs `f` on a fresh thread that has joined this namespace, and returns its result.
    ///
    /// Sockets created in `f` belong to the namespace for their whole life, so a socket made
    /// here may be used afterwards from any thread. A panic in `f` is passed on to the caller.
    /// Only that one thread changes namespace: the test's own thread never moves.
    ///
    /// # Panics
    /// If the thread cannot join the namespace (a harness failure, not a test outcome).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = self.open().unwrap_or_else(|e| panic!("{e:#}"));
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(self.thread_name())
                .spawn_scoped(scope, move || {
                    enter(&file, &self.name).unwrap_or_else(|e| panic!("{e:#}"));
                    f()
                })
                .expect("spawning a thread");
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Like [`Netns::run`], for long-running work (a server loop): returns at once with the
    /// thread's handle, after the thread has joined the namespace.
    pub fn spawn<T, F>(&self, f: F) -> Result<JoinHandle<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = self.open()?;
        let name = self.name.clone();
        let (entered_tx, entered_rx) = mpsc::sync_channel(1);
        let handle = thread::Builder::new()
            .name(self.thread_name())
            .spawn(move || {
                let entered = enter(&file, &name);
                let failed = entered.is_err();
                // The receiver waits for this message; it cannot be gone yet.
                let _ = entered_tx.send(entered);
                if failed {
                    // The error went to the caller; end without running `f` (and without
                    // a second report from the panic hook).
                    std::panic::resume_unwind(Box::new("could not enter namespace"));
                }
                f()
            })
            .context("spawning a thread")?;
        entered_rx
            .recv()
            .map_err(|_| anyhow!("thread for namespace {} died before entering it", self.name))??;
        Ok(handle)
    }

    /// Writes a sysctl inside the namespace, e.g. `("net.ipv4.ip_forward", "1")`.
    ///
    /// Written from a thread in the namespace: `/proc/sys/net` shows the writer's namespace,
    /// and this needs no `sysctl` binary. A key containing `/` is taken as a path below
    /// `/proc/sys` as is (for interface names with dots).
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        self.run(|| std::fs::write(&path, value))
            .with_context(|| format!("setting {key}={value} in netns {}", self.name))
    }

    /// Reads a sysctl inside the namespace, trimmed.
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        let value = self
            .run(|| std::fs::read_to_string(&path))
            .with_context(|| format!("reading {key} in netns {}", self.name))?;
        Ok(value.trim().to_owned())
    }

    /// The interface index of `ifname` in this namespace, e.g. to attach a program to it.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let c_name = std::ffi::CString::new(ifname).context("interface name contains NUL")?;
        // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
        let index = self.run(|| unsafe { libc::if_nametoindex(c_name.as_ptr()) });
        if index == 0 {
            bail!("no interface {ifname} in netns {}", self.name);
        }
        Ok(index)
    }

    fn open(&self) -> Result<File> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        File::open(&path).with_context(|| format!("opening {}", path.display()))
    }

    /// Names the thread after the test's thread (the test name under `cargo test`) and the
    /// namespace, so a panic message says where it happened.
    fn thread_name(&self) -> String {
        let parent = thread::current().name().unwrap_or("thread").to_owned();
        format!("{parent}@{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_command("ip", &["netns", "del", &self.name]) {
            // Drop cannot fail; say so loudly instead of hiding a leak.
            eprintln!("lb-tests: could not delete netns {}: {e:#}", self.name);
        }
    }
}

/// Moves the calling thread into the namespace behind `file`.
fn enter(file: &File, name: &str) -> Result<()> {
    // SAFETY: setns only reads the fd, which `file` keeps open for the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns into netns {name}"));
    }
    Ok(())
}

fn sysctl_path(key: &str) -> PathBuf {
    let relative = if key.contains('/') {
        key.to_owned()
    } else {
        key.replace('.', "/")
    };
    PathBuf::from("/proc/sys").join(relative.trim_start_matches('/'))
}

/// Adds a route in `ns`: `spec` is what follows `ip route add`, e.g.
/// `"10.96.0.0/16 via 10.200.1.1"`. IPv6 routes work the same (`ip` picks the family).
pub fn add_route(ns: &Netns, spec: &str) -> Result<()> {
    let mut args = vec!["route", "add"];
    args.extend(spec.split_whitespace());
    ns.ip(&args)?;
    Ok(())
}

/// Adds an address (`10.96.0.1/32`, `fd00::1/128`) to an interface in `ns`.
///
/// IPv6 addresses skip duplicate address detection, which would otherwise keep them unusable
/// for a second or two.
pub fn add_address(ns: &Netns, ifname: &str, cidr: &str) -> Result<()> {
    let mut args = vec!["addr", "add", cidr, "dev", ifname];
    if cidr.contains(':') {
        args.push("nodad");
    }
    ns.ip(&args)?;
    Ok(())
}

/// Creates a dummy interface (a place to hold addresses such as service VIPs) in `ns`, sets
/// it up and returns its unique name.
///
/// Some kernels are built without `CONFIG_DUMMY` (the 6.18 test machines are); there an `ifb`
/// device stands in: it also holds addresses and silently drops what is sent to it.
pub fn add_dummy(ns: &Netns, prefix: &str) -> Result<String> {
    let name = unique_name(prefix);
    if let Err(dummy) = ns.ip(&["link", "add", &name, "type", "dummy"]) {
        ns.ip(&["link", "add", &name, "type", "ifb"])
            .with_context(|| format!("no dummy device ({dummy:#}), and no ifb either"))?;
    }
    ns.ip(&["link", "set", &name, "up"])?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::require_root;

    fn listed(name: &str) -> bool {
        let list = run_command("ip", &["netns", "list"]).unwrap();
        list.lines()
            .any(|line| line.split_whitespace().next() == Some(name))
    }

    #[test]
    fn drop_removes_namespace() {
        if !require_root() {
            return;
        }
        let ns = Netns::new("drop").unwrap();
        let name = ns.name().to_owned();
        assert!(listed(&name), "{name} missing from ip netns list");
        drop(ns);
        assert!(!listed(&name), "{name} still in ip netns list after drop");
    }

    #[test]
    fn panic_still_removes_namespace() {
        if !require_root() {
            return;
        }
        let (tx, rx) = mpsc::channel();
        let result = std::panic::catch_unwind(move || {
            let ns = Netns::new("pnc").unwrap();
            tx.send(ns.name().to_owned()).unwrap();
            ns.run(|| panic!("expected panic inside the namespace"));
        });
        assert!(result.is_err(), "the panic in run must reach the caller");
        let name = rx.recv().unwrap();
        assert!(!listed(&name), "{name} left behind by a panicking test");
    }

    #[test]
    fn run_enters_namespace_and_exec_works() {
        if !require_root() {
            return;
        }
        let ns = Netns::new("run").unwrap();
        // A fresh namespace has only `lo`, with index 1; the test's own thread stays put.
        assert_eq!(ns.ifindex("lo").unwrap(), 1);
        assert!(ns.ifindex("no-such-if").is_err());
        let links = ns.exec(&["ip", "-o", "link"]).unwrap();
        assert_eq!(links.lines().count(), 1, "{links}");
        let err = ns.exec(&["false"]).unwrap_err();
        assert!(format!("{err:#}").contains(ns.name()));
    }

    #[test]
    fn sysctl_is_per_namespace() {
        if !require_root() {
            return;
        }
        let a = Netns::new("sya").unwrap();
        let b = Netns::new("syb").unwrap();
        a.set_sysctl("net.ipv4.ip_forward", "1").unwrap();
        assert_eq!(a.sysctl("net.ipv4.ip_forward").unwrap(), "1");
        assert_eq!(b.sysctl("net.ipv4.ip_forward").unwrap(), "0");
    }

    #[test]
    fn spawn_runs_in_namespace() {
        if !require_root() {
            return;
        }
        let ns = Netns::new("spn").unwrap();
        let handle = ns
            .spawn(|| std::net::TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr()))
            .unwrap();
        handle.join().unwrap().unwrap().unwrap();
    }

    #[test]
    fn dummy_and_route() {
        if !require_root() {
            return;
        }
        let ns = Netns::new("dum").unwrap();
        let dummy = add_dummy(&ns, "vip").unwrap();
        add_address(&ns, &dummy, "10.200.9.1/24").unwrap();
        add_address(&ns, &dummy, "fd00:200:9::1/64").unwrap();
        add_route(&ns, "10.96.0.0/16 via 10.200.9.2").unwrap();
        let routes = ns.ip(&["route", "show"]).unwrap();
        assert!(routes.contains("10.96.0.0/16 via 10.200.9.2"), "{routes}");
        assert!(ns.ifindex(&dummy).unwrap() > 1);
    }
}
