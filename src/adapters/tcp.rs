//! TCP probe: healthy iff a connection to `host:port` is accepted within the timeout.

use std::time::Duration;

use super::{substitute_worker, timeout_reason, BoxFuture, WorkerProbe};
use crate::core::check::ProbeOutcome;

pub(super) struct TcpProbe {
    address_template: String,
    timeout: Duration,
}

impl TcpProbe {
    pub(super) fn new(address_template: String, timeout: Duration) -> Self {
        TcpProbe {
            address_template,
            timeout,
        }
    }
}

impl WorkerProbe for TcpProbe {
    fn probe<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, ProbeOutcome> {
        Box::pin(async move {
            let address = substitute_worker(&self.address_template, worker);
            // The timeout covers name resolution as well as the connect.
            match tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(&address)).await
            {
                Ok(Ok(_stream)) => ProbeOutcome::Ok,
                Ok(Err(error)) => ProbeOutcome::failed(format!("connect to {address}: {error}")),
                Err(_) => ProbeOutcome::failed(timeout_reason(self.timeout)),
            }
        })
    }
}
