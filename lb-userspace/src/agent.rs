//! The long-running agent: loads the data plane, attaches it, programs the services of
//! its configuration, and reloads on change (file modified, or SIGHUP). A configuration
//! that fails to parse or apply is reported and the last good one keeps running.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use log::{error, info, warn};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    config::{self, Config},
    dataplane::{sync::Programmer, AttachMode, Dataplane},
};

/// An interface to attach to and how.
#[derive(Clone, Debug)]
pub struct InterfaceSpec {
    pub name: String,
    pub mode: AttachMode,
}

impl std::str::FromStr for InterfaceSpec {
    type Err = anyhow::Error;
    /// `IFACE` (TC) or `IFACE:xdp` / `IFACE:tc`.
    fn from_str(s: &str) -> Result<Self> {
        let (name, mode) = match s.split_once(':') {
            Some((n, m)) => (n, m.parse()?),
            None => (s, AttachMode::Tc),
        };
        if name.is_empty() || name.len() > 15 {
            anyhow::bail!("interface name {name:?} must be 1-15 characters");
        }
        Ok(Self {
            name: name.to_string(),
            mode,
        })
    }
}

pub struct AgentOptions {
    pub config: PathBuf,
    pub interfaces: Vec<InterfaceSpec>,
    /// How often the configuration file is checked for changes.
    pub watch_interval: Duration,
    /// How often counters are logged (None: never).
    pub stats_interval: Option<Duration>,
}

/// A loaded, attached and programmed data plane.
pub struct Agent {
    pub dataplane: Dataplane,
    pub programmer: Programmer,
    pub config: Config,
}

impl Agent {
    /// Loads `config`, the programs and attaches them. Fails without side effects left
    /// behind (links are dropped with the data plane).
    pub fn start(config: Config, interfaces: &[InterfaceSpec]) -> Result<Self> {
        let mut dataplane = Dataplane::load(&config.dataplane)?;
        for i in interfaces {
            dataplane.attach(&i.name, i.mode)?;
        }
        let mut programmer = Programmer::default();
        programmer.apply(&mut dataplane, &config::desired_services(&config))?;
        Ok(Self {
            dataplane,
            programmer,
            config,
        })
    }

    /// Applies a new configuration; on error the running state is kept.
    pub fn reload(&mut self, new: Config) -> Result<()> {
        if new.dataplane != self.config.dataplane {
            warn!(
                "dataplane sizes and timeouts are fixed at start; restart the agent to change them"
            );
        }
        self.programmer
            .apply(&mut self.dataplane, &config::desired_services(&new))?;
        self.config = Config {
            dataplane: self.config.dataplane.clone(),
            ..new
        };
        Ok(())
    }
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

pub async fn run(opts: AgentOptions) -> Result<()> {
    let cfg = config::load(&opts.config)?;
    let mut agent = Agent::start(cfg, &opts.interfaces)?;
    info!(
        "lb agent running: {} services on {}",
        agent.config.services.len(),
        opts.interfaces
            .iter()
            .map(|i| format!("{}:{:?}", i.name, i.mode))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut last_mtime = modified(&opts.config);
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut watch = tokio::time::interval(opts.watch_interval);
    let mut stats = tokio::time::interval(opts.stats_interval.unwrap_or(Duration::from_secs(3600)));
    loop {
        let reload = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => true,
            _ = watch.tick() => {
                let m = modified(&opts.config);
                let changed = m != last_mtime;
                last_mtime = m;
                changed
            }
            _ = stats.tick(), if opts.stats_interval.is_some() => {
                log_counters(&agent.dataplane);
                false
            }
        };
        if reload {
            let applied = config::load(&opts.config).and_then(|c| {
                agent
                    .reload(c)
                    .with_context(|| format!("applying {}", opts.config.display()))
            });
            match applied {
                Ok(()) => info!(
                    "configuration reloaded: {} services",
                    agent.config.services.len()
                ),
                Err(e) => {
                    error!("configuration not applied, the previous one stays in force: {e:#}")
                }
            }
        }
    }
    info!("lb agent stopping; programs are detached");
    Ok(())
}

fn log_counters(dp: &Dataplane) {
    match dp.counters() {
        Ok(counters) => {
            let nonzero: Vec<String> = counters
                .iter()
                .filter(|(_, v)| *v > 0)
                .map(|(c, v)| format!("{}={v}", c.label()))
                .collect();
            info!("counters: {}", nonzero.join(" "));
        }
        Err(e) => warn!("reading counters: {e:#}"),
    }
}
