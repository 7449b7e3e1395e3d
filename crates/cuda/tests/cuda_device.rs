//! Opening a device: the failures a user can meet are one clear line, never a panic.

mod support;

use lmtrain_cuda::{CudaDevice, CudaError};
use support::{Child, Mode, run_children};

fn assert_one_line(e: &CudaError) -> String {
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "error spans several lines: {msg}");
    assert!(msg.starts_with("no NVIDIA driver found"), "unexpected message: {msg}");
    msg
}

/// In this process nothing points the loader at the emulator: on a machine without an NVIDIA
/// driver, opening a device reports exactly that.
#[test]
fn open_without_driver_is_one_clear_line() {
    if std::env::var("LMTRAIN_CUDA_CHILD").is_ok() {
        return; // the emulator is loaded in children: not this test's subject
    }
    // SAFETY: only tries to dlopen libcuda.so.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        support::skip("open_without_driver_is_one_clear_line", "an NVIDIA driver is installed");
        return;
    }
    let err = CudaDevice::open(0).expect_err("no driver, yet a device opened");
    assert!(matches!(err, CudaError::NoDriver), "{err:?}");
    println!("{}", assert_one_line(&err));
}

/// The emulator answers as libcuda.so only in tests: without LMTRAIN_CUEMU=1 it is refused.
#[test]
fn emulator_refused_outside_tests() {
    match support::mode() {
        Mode::Direct if std::env::var("LMTRAIN_CUDA_CHILD").is_ok() => {
            let err = CudaDevice::open(0).expect_err("the emulator was accepted without LMTRAIN_CUEMU=1");
            assert!(matches!(err, CudaError::EmulatorOnly), "{err:?}");
            println!("{}", assert_one_line(&err));
        }
        Mode::Direct => support::skip("emulator_refused_outside_tests", "running on a real driver"),
        Mode::Skip(why) => support::skip("emulator_refused_outside_tests", why),
        Mode::Emulate(dir) => run_children(
            &["emulator_refused_outside_tests"],
            &Child { lib_dir: dir, order: "forward", asan_runtime: None, allow_emulator: false },
        ),
    }
}

/// The device (the emulator in CI) opens, names itself and has every kernel loaded.
#[test]
fn device_opens_with_all_kernels() {
    support::on_device("device_opens_with_all_kernels", |dev| {
        println!("device: {} ({:?})", dev.name(), dev.kind());
        for name in lmtrain_cuda::kernel_names() {
            dev.function(name).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(lmtrain_cuda::kernel_names().count() >= 14);
    });
}
