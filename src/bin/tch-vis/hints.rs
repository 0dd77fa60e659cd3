//! What to say about a flag tch-vis does not have, where users of other
//! saliency tools (or of other commands) reach for it. clap's own tip goes
//! by spelling only (`--force` → `--score`, `--threads` → `--shard`); these
//! go by meaning, and each is given only where the subcommand has the flag
//! it points to.

/// (mistaken flags, the flag the advice needs, the advice).
const HINTS: &[(&[&str], &str, &str)] = &[
    (
        &["--force", "-f", "--clobber", "--recompute", "--redo"],
        "overwrite",
        "--overwrite recomputes images whose outputs exist",
    ),
    (
        &[
            "--resume",
            "--continue",
            "--skip-existing",
            "--no-overwrite",
        ],
        "overwrite",
        "a rerun into the same --out resumes by itself: images whose outputs exist are skipped \
         (--overwrite recomputes them)",
    ),
    (
        &["--gpu", "--cuda", "--use-gpu", "--use-cuda", "--cpu"],
        "device",
        "the device is --device cuda, cuda:N, cpu or auto (the default: CUDA where there is one)",
    ),
    (
        &[
            "--input",
            "--inputs",
            "--input-dir",
            "--image",
            "--image-dir",
            "--images-dir",
            "--data",
            "--data-dir",
            "--dir",
            "-i",
        ],
        "images",
        "the inputs are --images DIR (a folder, or one image file) or --images-from FILE (a list)",
    ),
    (
        &["--output", "--output-dir", "--outdir", "--out-dir", "-o"],
        "out",
        "the output folder is --out OUT",
    ),
    (
        &[
            "--samples",
            "--n-samples",
            "--nsamples",
            "--num-samples",
            "--smoothgrad",
            "--smooth",
        ],
        "smooth-samples",
        "SmoothGrad is --smooth-samples N (with --smooth-noise F)",
    ),
    (
        &["--noise", "--noise-level", "--sigma", "--stdev"],
        "smooth-noise",
        "SmoothGrad's noise level is --smooth-noise F (with --smooth-samples N)",
    ),
    (
        &[
            "--class",
            "--classes",
            "--class-index",
            "--class-idx",
            "--index",
            "--target",
            "--targets",
            "--target-class",
            "--label",
        ],
        "score",
        "a class is chosen with --score categorical:I, one --score per model output",
    ),
    (
        &["--layer", "--layers", "--target-layer", "--target-layers"],
        "method",
        "the target layer is fixed when the model is exported: the layer whose output its \
         forward_features(x) returns (scripts/export_cam_model.py --layer NODE)",
    ),
    (
        &["--cam", "--cam-method", "--algorithm", "--algo"],
        "method",
        "the CAM is chosen with --method METHOD (gradcam, gradcam++, layercam, scorecam, ...)",
    ),
    (
        &[
            "--n-steps",
            "--nsteps",
            "--num-steps",
            "--iterations",
            "--iters",
            "--epochs",
        ],
        "steps",
        "the number of steps is --steps N",
    ),
    (
        &["--batch", "--batchsize", "--bs", "-b"],
        "batch-size",
        "the batch size is --batch-size N",
    ),
    (
        &[
            "--threads",
            "--num-threads",
            "--workers",
            "--num-workers",
            "--jobs",
            "-j",
        ],
        "shard",
        "tch-vis sizes its threads to the machine's cores by itself; to split a folder across \
         processes or machines, run one worker per --shard K/N into the same --out",
    ),
    (
        &[
            "--npy",
            "--save-grad",
            "--save-grads",
            "--save-gradients",
            "--grad",
        ],
        "save-npy",
        "--save-npy also writes REL.grad.npy, the signed input gradient",
    ),
    (
        &["--fp16", "--half", "--bf16", "--amp", "--mixed-precision"],
        "precision",
        "half precision is --precision fp16 or bf16",
    ),
    (
        &[
            "--labels",
            "--label-file",
            "--mean",
            "--std",
            "--input-size",
            "--size",
            "--resize",
            "--crop",
            "--normalize",
            "--channels",
        ],
        "model",
        "preprocessing and labels are read from the model's sidecar M.json beside M.pt \
         (input_size, channels, mean, std, labels; resize, interpolation, antialias, crop)",
    ),
];

/// The advice for `arg` (as typed, `--flag` or `--flag=value`), an
/// argument `command` does not have, if one fits.
pub fn unknown_flag(arg: &str, command: &clap::Command) -> Option<&'static str> {
    let flag = arg.split_once('=').map_or(arg, |(f, _)| f);
    let (_, needs, advice) = HINTS.iter().find(|(wrong, _, _)| wrong.contains(&flag))?;
    command
        .get_arguments()
        .any(|a| a.get_long() == Some(needs))
        .then_some(*advice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn sub(name: &str) -> clap::Command {
        crate::args::Cli::command()
            .find_subcommand(name)
            .cloned()
            .unwrap()
    }

    #[test]
    fn every_advice_names_a_flag_some_command_has() {
        let cli = crate::args::Cli::command();
        for (wrong, needs, advice) in HINTS {
            assert!(
                cli.get_subcommands()
                    .any(|c| c.get_arguments().any(|a| a.get_long() == Some(needs))),
                "{needs}"
            );
            assert!(!advice.is_empty());
            for w in *wrong {
                // A mistaken flag is one no command has.
                for c in cli.get_subcommands() {
                    assert!(
                        c.get_arguments().all(|a| {
                            a.get_long().map(|l| format!("--{l}")).as_deref() != Some(w)
                                && a.get_short().map(|s| format!("-{s}")).as_deref() != Some(w)
                        }),
                        "{w} is a flag of {}",
                        c.get_name()
                    );
                }
            }
        }
    }

    #[test]
    fn advice_only_where_the_command_has_the_flag() {
        assert!(unknown_flag("--force", &sub("saliency"))
            .unwrap()
            .contains("--overwrite"));
        assert!(unknown_flag("--class=3", &sub("cam"))
            .unwrap()
            .contains("categorical:I"));
        assert!(unknown_flag("--layer", &sub("cam"))
            .unwrap()
            .contains("forward_features"));
        // saliency has no --method, so no word about CAM layers there;
        // maximize has no --overwrite.
        assert_eq!(unknown_flag("--layer", &sub("saliency")), None);
        assert_eq!(unknown_flag("--force", &sub("maximize")), None);
        assert_eq!(unknown_flag("--frobnicate", &sub("saliency")), None);
    }
}
