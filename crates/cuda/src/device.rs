//! Opening a device and loading the embedded kernel modules.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nvrtc::Ptx;

use crate::{CudaError, Result, driver, embedded};

/// What is behind a [`CudaDevice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// An NVIDIA GPU through the real driver.
    Gpu,
    /// lmtrain's CPU emulator (fake libcuda), used by the tests on machines without a GPU.
    Emulator,
}

/// Name prefix the emulator reports for its device (see kernels/emu/fake_cuda.cpp).
const EMULATOR_NAME: &str = "cuemu";

/// One CUDA device with its default stream and every embedded kernel loaded.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    name: String,
    kind: DeviceKind,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("name", &self.name).field("kind", &self.kind).finish()
    }
}

impl CudaDevice {
    /// Opens device `ordinal` and loads the kernels.
    ///
    /// Errors, each one line: [`CudaError::NoDriver`] when libcuda.so cannot be loaded (checked
    /// before cudarc, which would panic), [`CudaError::EmulatorOnly`] when libcuda.so is
    /// lmtrain's emulator and `LMTRAIN_CUEMU=1` is not set, [`CudaError::NoKernels`] when this
    /// build has no kernels, [`CudaError::Driver`] for a missing ordinal or a failed load.
    pub fn open(ordinal: usize) -> Result<Self> {
        let (ctx, name, kind) = context(ordinal)?;
        if !crate::kernels_built() {
            return Err(CudaError::NoKernels);
        }
        let mut functions = HashMap::new();
        for (module_name, image, kernels) in embedded::MODULES {
            let module = ctx.load_module(Ptx::from_binary(image.to_vec())).map_err(driver(format!("loading kernels/{module_name}.cu")))?;
            for kernel in *kernels {
                let f = module.load_function(kernel).map_err(driver(format!("loading kernel {kernel}")))?;
                functions.insert(*kernel, f);
            }
        }
        let stream = ctx.default_stream();
        Ok(Self { ctx, stream, functions, name, kind })
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A GPU or the emulator.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// The name and `(free, total)` memory in bytes of device `ordinal` (`cuMemGetInfo`: free is
    /// what is left beside this context and every other user of the device), without loading
    /// the kernels: a memory check before the device is opened for work. The errors of
    /// [`CudaDevice::open`] but the missing kernels.
    pub fn query_memory(ordinal: usize) -> Result<(String, u64, u64)> {
        let (ctx, name, _) = context(ordinal)?;
        let (free, total) = ctx.mem_get_info().map_err(driver("reading the device's memory"))?;
        Ok((name, free as u64, total as u64))
    }

    /// The cudarc context (for code that needs more than the wrappers here).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every wrapper launches on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Copies a host slice into a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(driver("copying to the device"))
    }

    /// Copies a device buffer back to the host (waits for pending work on the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(dev).map_err(driver("copying from the device"))
    }

    /// A zero-filled device buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(len).map_err(driver("allocating device memory"))
    }

    /// Waits until all launched work has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver("synchronizing"))
    }

    /// A loaded kernel by its symbol name (e.g. `layernorm_fwd_f32`), for direct cudarc launches.
    pub fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| CudaError::MissingKernel(name.to_string()))
    }
}

/// The primary context of device `ordinal` (shared by every open of it), its name and kind;
/// refuses a missing driver and, outside the tests, the emulator.
fn context(ordinal: usize) -> Result<(Arc<CudaContext>, String, DeviceKind)> {
    // SAFETY: only loads the shared library (dlopen) and reports whether that worked.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    let ctx = CudaContext::new(ordinal).map_err(driver(format!("opening device {ordinal}")))?;
    let name = ctx.name().map_err(driver("reading the device name"))?;
    let kind = if name.starts_with(EMULATOR_NAME) { DeviceKind::Emulator } else { DeviceKind::Gpu };
    if kind == DeviceKind::Emulator && std::env::var("LMTRAIN_CUEMU").as_deref() != Ok("1") {
        return Err(CudaError::EmulatorOnly);
    }
    Ok((ctx, name, kind))
}
