//! A small QMP client: one connection per conversation, JSON lines over a unix socket.
//! Asynchronous events that arrive between replies are skipped.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::DriverError;

const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Qmp {
    path: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, DriverError> {
        let p = path.display().to_string();
        let stream = tokio::time::timeout(TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| qmp_err(&p, "connect timed out"))?
            .map_err(|e| qmp_err(&p, e))?;
        let (r, writer) = stream.into_split();
        let mut qmp = Self {
            path: p,
            reader: BufReader::new(r),
            writer,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_err(
                &qmp.path,
                format!("unexpected greeting {greeting}"),
            ));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, DriverError> {
        let mut line = String::new();
        let n = tokio::time::timeout(TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| qmp_err(&self.path, "no reply within 10 s"))?
            .map_err(|e| qmp_err(&self.path, e))?;
        if n == 0 {
            return Err(qmp_err(&self.path, "QEMU closed the connection"));
        }
        serde_json::from_str(&line)
            .map_err(|e| qmp_err(&self.path, format!("bad JSON {line:?}: {e}")))
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, DriverError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| qmp_err(&self.path, e))?;
        loop {
            let reply = self.read_message().await?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                let desc = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(qmp_err(&self.path, format!("{command}: {desc}")));
            }
            // An event: not ours to handle here.
        }
    }
}

fn qmp_err(path: &str, e: impl std::fmt::Display) -> DriverError {
    DriverError::Qmp {
        path: path.to_string(),
        message: e.to_string(),
    }
}
