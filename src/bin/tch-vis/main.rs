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
mod hints;
mod maximize;
mod run;

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::CommandFactory;
use clap::Parser;
use run::Failure;
use tch_vis::message_line as first_line;

fn run() -> Result<(), Failure> {
    let cli = match args::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = e.print();
                return Ok(());
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
                return Err(Failure::Flags(
                    "a subcommand is required: saliency, scores, cam, integrated-gradients or maximize (see tch-vis --help)".into(),
                ))
            }
            _ => return Err(flag_failure(&e)),
        },
    };
    match cli.into_request().map_err(Failure::Flags)? {
        args::Request::Batch(job) => run::execute(job),
        args::Request::Maximize(a) => maximize::execute(a),
    }
}

/// A clap error as one line: clap's message up to its usage lines, with
/// advice where tch-vis has some (a shell glob's stray files, a flag of
/// another tool), and the help to read.
fn flag_failure(e: &clap::Error) -> Failure {
    // The subcommand named, if any.
    let command = std::env::args_os()
        .nth(1)
        .and_then(|c| c.into_string().ok())
        .and_then(|c| args::Cli::command().find_subcommand(&c).cloned());
    let invalid = (e.kind() == ErrorKind::UnknownArgument)
        .then(|| e.get(clap::error::ContextKind::InvalidArg))
        .flatten()
        .map(|a| a.to_string());
    // A shell glob hands `--images` several files: the extra
    // ones arrive as unexpected arguments.
    let stray_file = invalid
        .as_deref()
        .is_some_and(|a| std::path::Path::new(a).is_file());
    let advice = invalid
        .as_deref()
        .zip(command.as_ref())
        .and_then(|(a, c)| hints::unknown_flag(a, c));
    // clap's message, up to its usage lines, on one line; its
    // tip (a flag spelled alike) gives way to advice by meaning.
    let text = e.to_string();
    let line = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
        .filter(|l| !l.is_empty())
        .filter(|l| advice.is_none() || !l.starts_with("tip:"))
        .collect::<Vec<_>>()
        .join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line).to_string();
    let hint = if stray_file {
        "; --images takes one folder or file (a shell glob gives it several): \
         list files with --images-from FILE, or - for standard input"
            .to_string()
    } else {
        advice.map(|a| format!("; {a}")).unwrap_or_default()
    };
    // The subcommand's own help, where one was named.
    let help = command.map_or_else(
        || "tch-vis --help".to_string(),
        |c| format!("tch-vis {} --help", c.get_name()),
    );
    Failure::Flags(format!("{}{hint} (see {help})", first_line(&line)))
}

fn main() -> ExitCode {
    tch_vis::batch::tune_malloc();
    // IEEE float32 on CUDA: cuDNN would otherwise run fp32 convolutions in
    // TF32 (PyTorch's default), about 1e-3 relative off the CPU values. Set
    // before any thread or CUDA context exists; the user's value wins.
    if std::env::var_os("NVIDIA_TF32_OVERRIDE").is_none() {
        std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    }
    // One line, never a backtrace, even with RUST_BACKTRACE set. Not on a
    // decode thread: a decoder's panic there fails its file (recorded in
    // report.json with the message) and the run goes on; any other panic
    // there ends the run with the line of its scope's panic here.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        if thread
            .name()
            .is_some_and(|n| n.starts_with("tch-vis-decode-"))
        {
            return;
        }
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
    let code = match std::panic::catch_unwind(run) {
        Ok(Ok(())) => 0,
        Ok(Err(f)) => {
            let _ = writeln!(std::io::stderr(), "tch-vis: error: {}", f.message());
            f.code()
        }
        Err(_) => 1,
    };
    exit_now(code)
}

/// Ends the process with `code` once standard output is flushed. On Unix
/// without running the C++ static destructors of libtorch and its CUDA
/// libraries (`_exit`): everything tch-vis writes is closed by then, and
/// they took 0.1–0.15 s of every run's wall time, unregistering thousands
/// of operators from tables the process is about to drop.
fn exit_now(code: u8) -> ExitCode {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    #[cfg(unix)]
    {
        extern "C" {
            fn _exit(status: std::os::raw::c_int) -> !;
        }
        // SAFETY: `_exit` ends the process; every Rust value of the run was
        // dropped when `run` returned and both standard streams are flushed.
        unsafe { _exit(i32::from(code)) }
    }
    #[cfg(not(unix))]
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_come_from_the_kind_of_failure() {
        let usage = Failure::Usage(tch_vis::Error::CudaUnavailable {
            requested: "cuda".into(),
        });
        assert_eq!(usage.code(), 2);
        assert_eq!(Failure::Flags("x".into()).code(), 2);
        let run = Failure::Run(tch_vis::Error::Internal { what: "x".into() });
        assert_eq!(run.code(), 1);
        let strict = Failure::Strict {
            failed: 2,
            report: "out/report.json".into(),
        };
        assert_eq!(strict.code(), 1);
        assert_eq!(
            strict.message(),
            "2 inputs failed (--strict); see out/report.json"
        );
        // Context is kept, and libtorch's C++ frames are cut.
        let e = tch_vis::Error::Torch(tch::TchError::Torch(
            "boom (Exception raised from x at y.cpp:1)\nframe #0: z".into(),
        ))
        .context("loading model");
        assert_eq!(Failure::Usage(e).message(), "loading model: libtorch: boom");
    }
}
