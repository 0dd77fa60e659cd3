//! Choosing a device: `auto`, `cpu`, `cuda` or `cuda:N`.

use std::fmt;
use std::str::FromStr;

use tch::{Cuda, Device};

use crate::error::{Error, Result};

/// A device as a user names it.
///
/// ```
/// use tch_vis::DeviceSpec;
/// # fn main() -> tch_vis::Result<()> {
/// let spec: DeviceSpec = "cpu".parse()?;
/// assert_eq!(spec.resolve()?, tch::Device::Cpu);
/// // `auto` is the first CUDA device when there is one, else the CPU.
/// let _any = DeviceSpec::Auto.resolve()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 when CUDA is available, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA device (`cuda` is `cuda:0`; so is `gpu`, for those who type
    /// it; names are read without regard to case).
    Cuda(usize),
}

impl DeviceSpec {
    /// The `tch::Device` this names, checked against the machine.
    ///
    /// # Errors
    /// [`Error::CudaUnavailable`] when CUDA is asked for and there is none;
    /// [`Error::CudaDeviceOutOfRange`] for an index past the device count.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceSpec::Auto => Ok(Device::cuda_if_available()),
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(index) => {
                if !Cuda::is_available() {
                    return Err(Error::CudaUnavailable {
                        requested: self.to_string(),
                    });
                }
                let count = usize::try_from(Cuda::device_count()).unwrap_or(0);
                if index >= count {
                    return Err(Error::CudaDeviceOutOfRange { index, count });
                }
                Ok(Device::Cuda(index))
            }
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| Error::DeviceSpec(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A device as text: `cpu`, `cuda:0`, ...
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        for bad in ["", "cuda:", "cuda:x", "tpu", "cuda:-1"] {
            assert!(
                matches!(bad.parse::<DeviceSpec>(), Err(Error::DeviceSpec(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn cuda_without_cuda_is_a_typed_error() {
        if Cuda::is_available() {
            eprintln!("skipped: CUDA is present");
            return;
        }
        assert!(matches!(
            DeviceSpec::Cuda(0).resolve(),
            Err(Error::CudaUnavailable { .. })
        ));
    }
}
