//! `tch-vis`: scores and saliency maps for TorchScript models over folders
//! of images. A thin binary over the `tch_vis` library: it parses, checks,
//! orchestrates and reports.
//!
//! Exit status: 0 the run finished (also with failed inputs), 1 the run
//! failed while processing (or `--strict` and some inputs failed), 2 bad
//! usage or a problem found before the first image. Errors are one line on
//! stderr, `tch-vis: error: ...`, never a backtrace.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod args;
mod job;
mod table;

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use tch_vis::message_line as first_line;

/// A failure and its exit status.
struct Failure {
    code: u8,
    message: String,
}

/// One line for an error chain: each cause's first line, skipping causes
/// the message already contains.
fn one_line(err: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in err.chain() {
        let line = first_line(&cause.to_string());
        if line.is_empty() || msg.contains(&line) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&line);
    }
    msg
}

fn usage(err: anyhow::Error) -> Failure {
    Failure {
        code: 2,
        message: one_line(&err),
    }
}

fn run() -> Result<ExitCode, Failure> {
    let cli = match args::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = e.print();
                return Ok(ExitCode::SUCCESS);
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
                return Err(Failure {
                    code: 2,
                    message: "a subcommand is required: saliency or scores (see tch-vis --help)"
                        .into(),
                })
            }
            _ => {
                let text = e.to_string();
                let line = first_line(&text);
                let line = line.strip_prefix("error: ").unwrap_or(&line).to_string();
                return Err(Failure {
                    code: 2,
                    message: format!("{line} (see tch-vis --help)"),
                });
            }
        },
    };
    let job = cli.into_job().map_err(|m| Failure {
        code: 2,
        message: m,
    })?;
    let strict = job.strict;
    let out = job.out.clone();
    let ready = job::prepare(job).map_err(usage)?;
    let outcome = job::execute(ready).map_err(|e| Failure {
        code: 1,
        message: one_line(&e),
    })?;
    if let Some(fatal) = outcome.fatal {
        return Err(Failure {
            code: 1,
            message: first_line(&fatal),
        });
    }
    if strict && outcome.failed > 0 {
        return Err(Failure {
            code: 1,
            message: format!(
                "{} input{} failed (--strict); see {}",
                outcome.failed,
                if outcome.failed == 1 { "" } else { "s" },
                out.join("report.json").display()
            ),
        });
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // IEEE float32 on CUDA: cuDNN would otherwise run fp32 convolutions in
    // TF32 (PyTorch's default), about 1e-3 relative off the CPU values. Set
    // before any thread or CUDA context exists; the user's value wins.
    if std::env::var_os("NVIDIA_TF32_OVERRIDE").is_none() {
        std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    }
    // One line, never a backtrace, even with RUST_BACKTRACE set.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let _ = writeln!(
            std::io::stderr(),
            "tch-vis: error: internal error: {}",
            first_line(&msg)
        );
    }));
    match std::panic::catch_unwind(run) {
        Ok(Ok(code)) => code,
        Ok(Err(f)) => {
            let _ = writeln!(std::io::stderr(), "tch-vis: error: {}", f.message);
            ExitCode::from(f.code)
        }
        Err(_) => ExitCode::from(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_become_one_line_without_cpp_frames() {
        let e = anyhow::anyhow!("boom (Exception raised from x at y.cpp:1)\nframe #0: z")
            .context("loading model");
        assert_eq!(one_line(&e), "loading model: boom");
        let e = anyhow::anyhow!("inner").context("outer: inner");
        assert_eq!(one_line(&e), "outer: inner");
    }
}
