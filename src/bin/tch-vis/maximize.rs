//! `tch-vis maximize`: activation maximization, one image per sample.

use std::io::Write;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tch_vis::maximize::{ActivationMaximization, InputModifier, Regularizer, RmsProp};
use tch_vis::preprocess::Sidecar;
use tch_vis::scores::{Score, ScoreSpec};
use tch_vis::{device_name, io, Error, Model};

use crate::args::MaximizeArgs;
use crate::run::Failure;

/// Runs `maximize`; `Ok` means exit 0.
pub fn execute(a: MaximizeArgs) -> Result<(), Failure> {
    let start = Instant::now();
    let device = a.device.resolve().map_err(Failure::Usage)?;
    // The model before its sidecar, as in the batch commands.
    let model = Model::load(&a.model, device).map_err(Failure::Usage)?;
    let sidecar = Sidecar::for_model(&a.model)
        .map_err(|e| Failure::Usage(e.context("cannot read the model sidecar")))?;
    if let Ok(m) = std::fs::metadata(&a.out) {
        if !m.is_dir() {
            return Err(Failure::Usage(Error::OutputMismatch {
                path: a.out.clone(),
                reason: "exists and is not a directory".into(),
            }));
        }
    }
    // A folder run's results (or a folder run in progress, or killed):
    // its report.json would be replaced.
    let reason = match crate::run::report_command(&a.out).filter(|c| c != "maximize") {
        Some(other) => Some(format!(
            "holds the results of a {other} run (its report.json)"
        )),
        None => a.out.join(tch_vis::batch::JOURNAL_DIR).exists().then(|| {
            "holds a folder run's journals (.tch-vis: a run in progress, or killed)".into()
        }),
    };
    if let Some(reason) = reason {
        return Err(Failure::Usage(Error::OutputMismatch {
            path: a.out.clone(),
            reason: format!("{reason}: give maximize a folder of its own"),
        }));
    }
    // Every SPEC must fit its output (class indices in range) before anything is written.
    let [h, w] = sidecar.size_i64();
    let c = sidecar.channels as i64;
    let probe = Tensor::f_zeros([1, c, h, w], (Kind::Float, device))
        .map_err(|e| Failure::Usage(e.into()))?;
    let outputs = model.forward(&[probe]).map_err(Failure::Usage)?;
    ScoreSpec::check_outputs(&a.scores, &outputs).map_err(Failure::Usage)?;
    if let Some(index) = a
        .scores
        .iter()
        .position(|s| matches!(s, ScoreSpec::Predicted))
    {
        return Err(Failure::Usage(Error::Score {
            index,
            name: "predicted".into(),
            source: Box::new(Error::InvalidValue {
                what: "score for maximize (predicted needs an input image)",
                value: "predicted".into(),
            }),
        }));
    }
    let scores = a
        .scores
        .iter()
        .map(ScoreSpec::to_score)
        .collect::<tch_vis::Result<Vec<_>>>()
        .map_err(Failure::Usage)?;
    // With --log, each active score s is ascended as log(max(s, 1e-30)).
    let objective: Vec<Box<dyn Score + Send + Sync>> = a
        .scores
        .iter()
        .map(|spec| -> tch_vis::Result<Box<dyn Score + Send + Sync>> {
            let s = spec.to_score()?;
            Ok(if a.log && !matches!(spec, ScoreSpec::Inactive) {
                Box::new(LogScore(s))
            } else {
                s
            })
        })
        .collect::<tch_vis::Result<_>>()
        .map_err(Failure::Usage)?;
    let refs: Vec<&dyn Score> = objective.iter().map(|b| b.as_ref() as &dyn Score).collect();
    let mut am = ActivationMaximization::new(&model, [c as usize, h as usize, w as usize])
        .sidecar(&sidecar)
        .steps(a.steps as usize)
        .seed(a.seed)
        .regularizers(vec![
            Regularizer::TotalVariation2D { weight: a.tv },
            Regularizer::Norm {
                weight: a.norm,
                p: 1.0,
            },
        ])
        .input_modifiers(vec![
            InputModifier::Jitter {
                jitter: i64::from(a.jitter),
            },
            InputModifier::Rotate2D { degree: a.rotate },
        ])
        .optimizer(RmsProp {
            learning_rate: a.lr,
            ..RmsProp::default()
        });
    if let Some((rh, rw)) = a.resolution {
        am = am.resolution(rh, rw);
    }
    let res = am.maximize(&refs).map_err(|e| match e {
        e @ (Error::InvalidValue { .. } | Error::Shape { .. }) => Failure::Usage(e),
        e => Failure::Run(e),
    })?;
    let write = || -> tch_vis::Result<Vec<f32>> {
        let inputs = res.inputs.f_to_device(Device::Cpu)?;
        let images = res.images.f_to_device(Device::Cpu)?;
        let n = inputs.size()[0];
        for k in 0..n {
            io::write_npy_atomic(&a.out.join(format!("maximize_{k}.npy")), &inputs.f_get(k)?)?;
            let img = images.f_get(k)?.f_clamp(0.0, 1.0)?;
            let rgb = if c == 1 {
                img.f_repeat([3, 1, 1])?
            } else {
                img
            };
            let bytes = Vec::<u8>::try_from(
                &rgb.f_mul_scalar(255.0)?
                    .f_round()?
                    .f_permute([1, 2, 0])?
                    .f_contiguous()?
                    .f_to_kind(Kind::Uint8)?
                    .f_reshape([-1])?,
            )?;
            let png = tch_vis::heatmap::encode_png(&bytes, w as u32, h as u32)?;
            io::write_atomic(&a.out.join(format!("maximize_{k}.png")), &png)?;
        }
        // An earlier run's results past this run's samples would read as
        // this run's: removed (only files of exactly these names).
        if let Ok(read) = std::fs::read_dir(&a.out) {
            for e in read.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let stale = name
                    .strip_prefix("maximize_")
                    .and_then(|r| r.strip_suffix(".npy").or_else(|| r.strip_suffix(".png")))
                    .and_then(|k| k.parse::<i64>().ok())
                    .is_some_and(|k| {
                        k >= n
                            && [format!("maximize_{k}.npy"), format!("maximize_{k}.png")]
                                .contains(&name)
                    });
                if stale {
                    std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
                }
            }
        }
        // The plain scores of the result (not the --log objective).
        let outputs = model.forward(&[res.inputs.shallow_clone()])?;
        let total = scores
            .iter()
            .zip(&outputs)
            .map(|(s, o)| {
                let _g = tch::no_grad_guard();
                Ok(tch_vis::scores::evaluate(s.as_ref(), o)?
                    .f_to_device(Device::Cpu)?
                    .f_to_kind(Kind::Float)?)
            })
            .collect::<tch_vis::Result<Vec<_>>>()?;
        let sum = total.iter().try_fold(
            Tensor::f_zeros([n], (Kind::Float, Device::Cpu))?,
            |acc, s| acc.f_add(s),
        )?;
        Ok(Vec::<f32>::try_from(&sum)?)
    };
    let finals = write().map_err(Failure::Run)?;
    if let Some(note) = res
        .curve
        .first()
        .and_then(|first| falling_note(first, &finals, a.tv, a.norm))
    {
        let _ = writeln!(std::io::stderr(), "tch-vis: note: {note}");
    }
    let seconds = start.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "command": "maximize",
        "model": a.model.display().to_string(),
        "scores": a.scores.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "samples": finals.len(),
        "steps": a.steps,
        "seed": a.seed,
        "tv": a.tv,
        "norm": a.norm,
        "rotate": a.rotate,
        "jitter": a.jitter,
        "lr": a.lr,
        "resolution": a.resolution,
        "device": device_name(device),
        "seconds": seconds,
        "final_scores": finals,
        "curve": res.curve,
        "tch_vis_version": env!("CARGO_PKG_VERSION"),
    });
    let text = serde_json::to_vec_pretty(&report).unwrap_or_default();
    io::write_atomic(&a.out.join("report.json"), &text).map_err(Failure::Run)?;
    let _ = writeln!(
        std::io::stdout(),
        "tch-vis maximize: {} image(s), {} steps in {seconds:.1} s on {}; final scores {finals:?}; outputs in {} (maximize_K.npy/.png, report.json)",
        finals.len(),
        a.steps,
        device_name(device),
        a.out.display()
    );
    Ok(())
}

/// A note for samples whose objective (summed over outputs) ended lower
/// than it began: the final image's score (as `report.json` gives it)
/// below the first step's (`Maximized::curve`). The regularizers outweigh
/// the score, as with the defaults on a model of small outputs (an
/// untrained one), and the image is not the score's maximum. `None` when
/// every sample's rose or held.
fn falling_note(first: &[f32], last: &[f32], tv: f64, norm: f64) -> Option<String> {
    let fell: Vec<String> = first
        .iter()
        .zip(last)
        .enumerate()
        .filter(|(_, (a, b))| b < a)
        .map(|(k, (a, b))| format!("{k} ({a:.4} -> {b:.4})"))
        .collect();
    (!fell.is_empty()).then(|| {
        format!(
            "the score fell over the steps for sample(s) {}: the regularizers (--tv {tv}, --norm {norm}) outweigh it for this model; try smaller --tv and --norm (or --log for probabilities)",
            fell.join(", ")
        )
    })
}

/// `log(max(s, 1e-30))` of a score.
struct LogScore(Box<dyn Score + Send + Sync>);

impl Score for LogScore {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn score(&self, output: &Tensor) -> tch_vis::Result<Tensor> {
        Ok(self.0.score(output)?.f_clamp_min(1e-30)?.f_log()?)
    }

    fn classes(&self, output: &Tensor) -> tch_vis::Result<Option<Vec<usize>>> {
        self.0.classes(output)
    }
}
