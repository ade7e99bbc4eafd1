//! One packet through lb's XDP or TC ingress program with `BPF_PROG_TEST_RUN`, as the
//! fixtures and the fuzzer run them.

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use lb::dataplane::{Dataplane, TC_INGRESS_PROGRAM, XDP_PROGRAM};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    Xdp,
    TcIngress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Pass,
    Drop,
    /// Sent out of another interface after a route lookup (XDP_REDIRECT, TC_ACT_REDIRECT).
    Redirect,
}

/// Runs `input` through `hook`'s program of `dp`: its verdict and the packet as it left.
pub fn run(dp: &mut Dataplane, hook: Hook, input: &[u8]) -> anyhow::Result<(Verdict, Vec<u8>)> {
    let mut out = vec![0u8; input.len() + 512];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
    let (code, len) = match hook {
        Hook::Xdp => {
            let p: &mut Xdp = dp.program_mut(XDP_PROGRAM)?.try_into()?;
            let r = p.test_run(opts)?;
            (r.return_value, r.data_size_out)
        }
        Hook::TcIngress => {
            let p: &mut SchedClassifier = dp.program_mut(TC_INGRESS_PROGRAM)?.try_into()?;
            let r = p.test_run(opts)?;
            (r.return_value, r.data_size_out)
        }
    };
    out.truncate(len as usize);
    let verdict = match (hook, code) {
        (Hook::Xdp, 2) | (Hook::TcIngress, 0) => Verdict::Pass,
        (Hook::Xdp, 1) | (Hook::TcIngress, 2) => Verdict::Drop,
        // XDP_REDIRECT, TC_ACT_REDIRECT: BPF_PROG_TEST_RUN reports them without sending
        // the packet.
        (Hook::Xdp, 4) | (Hook::TcIngress, 7) => Verdict::Redirect,
        (h, c) => anyhow::bail!("{h:?} returned unexpected code {c}"),
    };
    Ok((verdict, out))
}
