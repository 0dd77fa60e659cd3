//! Profile: where a Grad-CAM batch's device time goes, for CAM models of
//! either form (the `forward_features`/`forward_head` methods or the dict),
//! on one fixed batch: the median time of each stage run alone, the
//! stages interleaved round by round so each sees the same machine state.
//! Stages: `Model::forward` without a graph (the forward-pass ceiling),
//! `Model::features`, and `Cam::compute` (what the batch engine runs per
//! batch, maps at the input size included); for a methods-form file also
//! the same Grad-CAM written by hand with tch (features without a graph,
//! the head on a leaf, the gradient to it, the weighted sum).
//!
//! ```text
//! cargo run --release --example profile_cam -- --model bench-data/resnet18_cam.pt --batch 8 --device cpu
//! ```

use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use tch::{CModule, IValue, Kind, Tensor};
use tch_vis::cam::{Cam, CamMethod};
use tch_vis::scores::{CategoricalScore, Score};
use tch_vis::{CamForm, DeviceSpec, Model};

#[path = "common/timing.rs"]
mod timing;
use timing::{median, sync};

#[derive(Parser)]
struct Args {
    /// CAM models (either form); each is profiled in turn.
    #[arg(long, required = true)]
    model: Vec<String>,
    #[arg(long, default_value_t = 64)]
    batch: i64,
    /// Input height and width.
    #[arg(long, default_value_t = 224)]
    size: i64,
    /// Timed rounds.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Class scored.
    #[arg(long, default_value_t = 1)]
    class: usize,
    /// cuDNN's algorithm search on CUDA (the batch engine turns it on).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    cudnn_benchmark: bool,
}

type Stage<'a> = (&'static str, Box<dyn Fn() -> Result<()> + 'a>);

fn main() -> Result<()> {
    let args = Args::parse();
    let device = args.device.parse::<DeviceSpec>()?.resolve()?;
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(args.cudnn_benchmark);
    }
    let x = Tensor::randn([args.batch, 3, args.size, args.size], (Kind::Float, device));
    let score = CategoricalScore::new(args.class)?;
    let class = args.class as i64;
    for path in &args.model {
        let model = Model::load(path, device)?;
        let raw = if model.cam_form(&x)? == CamForm::Methods {
            let mut m = CModule::load_on_device(path, device)?;
            m.set_eval();
            for (_, p) in m.named_parameters()? {
                let _ = p.set_requires_grad(false);
            }
            Some(m)
        } else {
            None
        };
        let cam = Cam::new(&model, CamMethod::GradCam);
        let mut stages: Vec<Stage> = vec![
            (
                "forward (no graph)",
                Box::new(|| {
                    let _g = tch::no_grad_guard();
                    model.forward(&[x.shallow_clone()])?;
                    Ok(())
                }),
            ),
            (
                "features",
                Box::new(|| {
                    let _ = model.features(&x)?;
                    Ok(())
                }),
            ),
            (
                "Cam::compute gradcam",
                Box::new(|| {
                    cam.compute(&x, &[&score as &dyn Score])?;
                    Ok(())
                }),
            ),
        ];
        if let Some(m) = &raw {
            stages.push((
                "by hand with tch",
                Box::new(|| {
                    let a = {
                        let _g = tch::no_grad_guard();
                        match m
                            .method_is("forward_features", &[IValue::Tensor(x.shallow_clone())])?
                        {
                            IValue::Tensor(t) => t,
                            _ => anyhow::bail!("forward_features: not a tensor"),
                        }
                    };
                    let a = a.detach().set_requires_grad(true);
                    let out =
                        match m.method_is("forward_head", &[IValue::Tensor(a.shallow_clone())])? {
                            IValue::Tensor(t) => t,
                            _ => anyhow::bail!("forward_head: not a tensor"),
                        };
                    let objective = out.select(1, class).sum(Kind::Float);
                    let g = Tensor::run_backward(&[&objective], &[&a], false, false);
                    let _g = tch::no_grad_guard();
                    let w = g[0].mean_dim([2i64, 3].as_slice(), true, Kind::Float);
                    let _cam = (w * &a)
                        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
                        .relu();
                    Ok(())
                }),
            ));
        }
        // Warm-up: TorchScript's profiling runs, cuDNN's algorithm search.
        for _ in 0..5 {
            for (_, f) in &stages {
                f()?;
            }
        }
        sync(device);
        let mut times = vec![Vec::new(); stages.len()];
        for _ in 0..args.iters {
            for ((_, f), t) in stages.iter().zip(times.iter_mut()) {
                let start = Instant::now();
                f()?;
                sync(device);
                t.push(start.elapsed().as_secs_f64());
            }
        }
        for ((name, _), t) in stages.iter().zip(times.iter_mut()) {
            let m = median(t);
            println!(
                "profile-cam {path} batch {} {} (cudnn benchmark {}): {name} {:.2} ms ({:.1} images/s)",
                args.batch,
                tch_vis::device_name(device),
                args.cudnn_benchmark,
                m * 1e3,
                args.batch as f64 / m
            );
        }
    }
    Ok(())
}
