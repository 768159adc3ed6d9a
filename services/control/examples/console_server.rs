//! A tree with the control actor and nothing else in front of it, to try `llmos repl` /
//! `llmos ctl` by hand before (or without) `llmos serve`:
//! `cargo run -p llmos-control --example console_server -- STATE_DIR [MODEL.gguf]`, then
//! `llmos repl --state-dir STATE_DIR`. Stops on SIGINT/SIGTERM.

use std::path::PathBuf;

use llmos_control::{check_socket_free, control_spec};
use llmos_inference::{Runtime, RuntimeConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    llmos_device::init_cpu_threads(2);
    let mut args = std::env::args().skip(1);
    let state_dir = PathBuf::from(
        args.next()
            .ok_or("usage: console_server STATE_DIR [MODEL]")?,
    );
    let model = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/models/stories260K/stories260K-f32.gguf")
    });
    std::fs::create_dir_all(&state_dir)?;
    check_socket_free(&state_dir)?;
    let runtime = Runtime::boot_with(RuntimeConfig::new(model, &state_dir), |services| {
        vec![control_spec(services.clone())]
    })
    .await?;
    eprintln!(
        "console on {}",
        llmos_control::socket_path(&state_dir).display()
    );
    let exit = runtime.kernel().run_until_signal().await?;
    eprintln!("stopped: {exit:?}");
    Ok(())
}
