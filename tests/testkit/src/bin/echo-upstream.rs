//! `echo-upstream --listen ADDR`: the echo upstream as a process (demo, compose, benchmarks).
//!
//! Prints `ready http://ADDR` on stdout once listening, then serves until killed.

use anyhow::{bail, Context, Result};

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut listen = String::from("127.0.0.1:8081");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().context("--listen needs ADDR")?,
            "-h" | "--help" => {
                println!("usage: echo-upstream [--listen ADDR]   (default 127.0.0.1:8081)");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (usage: echo-upstream [--listen ADDR])"),
        }
    }
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let server = testkit::echo::spawn_echo(listener)?;
    println!("ready http://{}", server.addr());
    // SIGTERM matters in containers, where PID 1 gets no default signal handling.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(server);
    Ok(())
}
