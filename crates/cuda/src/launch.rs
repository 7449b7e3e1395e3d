//! A launch builder that records the size of every argument it pushes, so that a launch can
//! be refused when the Rust side and the kernel's PTX parameter list disagree (cuLaunchKernel
//! itself receives only untyped pointers and cannot tell).

use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};

use crate::{CudaDevice, CudaError, Result, driver, embedded};

pub(crate) struct Launch<'a> {
    kernel: String,
    args: LaunchArgs<'a>,
    sizes: Vec<usize>,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(dev: &'a CudaDevice, kernel: String) -> Result<Self> {
        let f = dev.function(&kernel)?;
        Ok(Self { args: dev.stream().launch_builder(f), kernel, sizes: Vec::new() })
    }

    /// A read-only device buffer (a pointer parameter).
    pub(crate) fn input<T>(&mut self, v: &'a CudaView<'_, T>) -> &mut Self {
        self.args.arg(v);
        self.sizes.push(size_of::<u64>());
        self
    }

    /// A device buffer the kernel writes (a pointer parameter).
    pub(crate) fn output<T>(&mut self, v: &'a mut CudaViewMut<'_, T>) -> &mut Self {
        self.args.arg(v);
        self.sizes.push(size_of::<u64>());
        self
    }

    /// An optional read-only device buffer: a null pointer when absent (kernels test for it).
    pub(crate) fn optional_input<T>(&mut self, v: Option<&'a CudaView<'_, T>>) -> &mut Self {
        static NULL: u64 = 0;
        match v {
            Some(v) => self.args.arg(v),
            None => self.args.arg(&NULL),
        };
        self.sizes.push(size_of::<u64>());
        self
    }

    /// A scalar parameter, passed by value.
    pub(crate) fn scalar<T: DeviceRepr>(&mut self, v: &'a T) -> &mut Self {
        self.args.arg(v);
        self.sizes.push(size_of::<T>());
        self
    }

    /// Launches after checking the pushed argument sizes against the PTX.
    ///
    /// # Safety
    /// The caller guarantees that the kernel, given these arguments and this configuration,
    /// accesses only the memory of the buffers it was given (i.e. the shapes were checked).
    pub(crate) unsafe fn launch(mut self, cfg: LaunchConfig) -> Result<()> {
        let declared = embedded::PARAMS
            .iter()
            .find(|(k, _)| *k == self.kernel)
            .map(|(_, p)| *p)
            .ok_or_else(|| CudaError::MissingKernel(self.kernel.clone()))?;
        if declared != self.sizes.as_slice() {
            return Err(CudaError::Signature { kernel: self.kernel, passed: self.sizes, declared: declared.to_vec() });
        }
        // SAFETY: argument count and sizes match the kernel's parameters (checked above) and the
        // caller vouches for the memory accesses.
        unsafe { self.args.launch(cfg) }.map_err(driver(format!("launching {}", self.kernel)))?;
        Ok(())
    }
}
