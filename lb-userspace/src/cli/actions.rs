//! `lb eject|uneject|drain|undrain ENDPOINT [--service S]`: operator actions through the
//! agent's admin endpoint, with its token.

use std::io::ErrorKind;

use anyhow::Result;
use serde::Serialize;

use super::{
    client::{self, Unreachable},
    fail, print, print_json, warn, ActionArgs, Output, EXIT_ERROR, EXIT_NO_AGENT, EXIT_NO_PINS,
};

#[derive(Serialize)]
struct Answer<'a> {
    action: &'a str,
    endpoint: String,
    service: Option<&'a str>,
    status: u16,
    answer: String,
}

/// The token in `path` (trimmed). A missing file is not fatal here: the agent decides
/// whether it needs one, and says so.
fn token(args: &ActionArgs) -> Result<Option<String>> {
    let path = &args.admin_token_file;
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t.trim().to_string())),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            warn(&format!(
                "no admin token at {} (the agent writes it when it starts; pass \
                 --admin-token-file if it writes elsewhere): sending the request without one",
                path.display()
            ));
            Ok(None)
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => Err(fail(
            EXIT_NO_PINS,
            format!(
                "cannot read the admin token {}: permission denied (it is root-only: run lb \
                 with sudo)",
                path.display()
            ),
        )),
        Err(e) => Err(fail(
            EXIT_ERROR,
            format!("reading the admin token {}: {e}", path.display()),
        )),
    }
}

pub fn action(args: &ActionArgs, action: &str) -> Result<()> {
    let token = token(args)?;
    let mut path = format!("/endpoints/{}/{action}", args.endpoint);
    if let Some(s) = &args.service {
        path.push_str(&format!("?service={}", client::encode(s)));
    }
    let headers: Vec<(&str, &str)> = token
        .as_deref()
        .map(|t| vec![("x-lb-token", t)])
        .unwrap_or_default();
    let admin = args.common.admin;
    let response = match client::request(admin, "POST", &path, &headers) {
        Ok(r) => r,
        Err(e) if e.downcast_ref::<Unreachable>().is_some() => {
            return Err(fail(
                EXIT_NO_AGENT,
                format!(
                    "the agent is not reachable at {admin} ({e:#}): is it running with \
                     --admin {admin}?"
                ),
            ))
        }
        Err(e) => return Err(e),
    };
    let body = response.body.trim().to_string();
    if args.common.output == Output::Json {
        print_json(&Answer {
            action,
            endpoint: args.endpoint.to_string(),
            service: args.service.as_deref(),
            status: response.status,
            answer: body.clone(),
        })?;
    }
    match response.status {
        200..=299 => {
            if args.common.output == Output::Table {
                print(&format!("{body}\n"))?;
            }
            Ok(())
        }
        401 | 403 => Err(fail(
            EXIT_ERROR,
            format!(
                "the agent refused the request ({}): {body}{}",
                response.status,
                if token.is_some() {
                    format!(
                        "; the token in {} is not the running agent's (pass its \
                         --admin-token-file)",
                        args.admin_token_file.display()
                    )
                } else {
                    String::new()
                }
            ),
        )),
        status => Err(fail(
            EXIT_ERROR,
            format!("the agent answered {status}: {body}"),
        )),
    }
}
